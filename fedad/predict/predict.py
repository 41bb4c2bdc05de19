"""``fedad predict``: score image files with a run's scorer in batches and write the outputs
(:mod:`fedad.predict.outputs`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fedad.predict.inputs import InputError, read_batches
from fedad.predict.outputs import (
    GRID,
    MASKS,
    OVERLAYS,
    PREDICTIONS,
    output_name,
    plot_most_anomalous,
    write_image_outputs,
    write_predictions,
)
from fedad.predict.run import Thresholds
from fedad.predict.scorers import Scorer

GRID_IMAGES = 8
"""Images in the grid of the most anomalous ones."""


@dataclass
class PredictResult:
    """What one ``fedad predict`` call scored and wrote.

    Attributes:
        table: predictions.csv's rows.
        skipped: one line per input that could not be read.
        written: predictions.csv and the grid (the overlays and masks are in its folders).
    """

    table: pd.DataFrame
    skipped: list[str]
    written: list[Path]


class _MostAnomalous:
    """The ``size`` highest-scoring images seen so far (by score, then raw score)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[tuple[float, float], np.ndarray, np.ndarray, str]] = []

    def add(self, scores: torch.Tensor, raw: torch.Tensor, images: torch.Tensor,
            maps: torch.Tensor, names: list[str]) -> None:
        """Offer a batch: scores and raw scores [B], images [B, 3, S, S], maps [B, S, S],
        names [B]."""
        self.items += [((float(s), float(r)), i.permute(1, 2, 0).numpy(), m.numpy(), n)
                       for s, r, i, m, n in zip(scores, raw, images, maps, names, strict=True)]
        self.items = sorted(self.items, key=lambda item: item[0], reverse=True)[:self.size]

    def plot(self, path: Path, title: str) -> Path:
        """The grid of :func:`~fedad.predict.outputs.plot_most_anomalous`."""
        keys, images, maps, names = zip(*self.items, strict=True)
        return plot_most_anomalous(np.stack(images), np.stack(maps),
                                   np.array([k[0] for k in keys]), list(names), path, title)


@torch.no_grad()
def predict_images(scorer: Scorer, paths: Sequence[Path], out: str | Path,
                   thresholds: Thresholds, batch_size: int = 4,
                   progress: bool = True) -> PredictResult:
    """Score ``paths`` with ``scorer`` (batches of ``batch_size``) and write into ``out``:
    predictions.csv, overlays/ and masks/ (one PNG each per image, at the file's
    resolution; masks at ``thresholds.pixel``) and the grid of the most anomalous images.

    Unreadable files are skipped (their lines in ``skipped``); InputError if none could
    be read, or for a batch size below 1."""
    if batch_size < 1:
        raise InputError(f"--batch-size={batch_size}: must be >= 1")
    out = Path(out)
    for folder in (out, out / OVERLAYS, out / MASKS):
        folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    skipped: list[str] = []
    top = _MostAnomalous(GRID_IMAGES)
    with tqdm(total=len(paths), unit="image", desc="fedad predict", disable=not progress,
              leave=False) as bar:
        for batch in read_batches(paths, scorer.image_size, batch_size, skipped):
            images = batch.images.to(scorer.device)
            raw, raw_maps = scorer.raw(images)
            scores, maps = scorer.calibrate(raw, raw_maps)
            types = scorer.defect_types(images)
            raw, scores, maps = raw.cpu(), scores.cpu(), maps.cpu()
            names = [output_name(len(rows) + i, p) for i, p in enumerate(batch.paths)]
            for i, path in enumerate(batch.paths):
                anomalous = float(scores[i]) >= thresholds.image
                overlay, mask = write_image_outputs(out, names[i], path, maps[i].numpy(),
                                                    thresholds.pixel)
                rows.append({"path": str(path), "score": float(scores[i]),
                             "decision": "anomalous" if anomalous else "normal",
                             "defect_type": (types[i] if anomalous else "good") if types else "",
                             "raw_score": float(raw[i]), "overlay": overlay, "mask": mask})
            top.add(scores, raw, batch.images, maps,
                    [f"{p.parent.name}/{p.name}" for p in batch.paths])
            bar.update(len(rows) + len(skipped) - bar.n)
    if not rows:
        raise InputError(f"none of the {len(paths)} input images could be read")
    grid = top.plot(out / GRID, f"most anomalous of {len(rows)} (anomalous: score >= "
                                f"{thresholds.image:g})")
    return PredictResult(pd.read_csv(write_predictions(out, rows), keep_default_na=False),
                         skipped, [out / PREDICTIONS, grid])
