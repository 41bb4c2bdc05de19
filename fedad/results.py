"""The results folder of a run: config, partitions, rounds.csv, summary.json, checkpoints, plots."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedad.config import ExperimentConfig
from fedad.metrics import defect_type_table
from fedad.plots import (
    pick_grid_indices,
    plot_anomaly_grid,
    plot_client_weights,
    plot_metrics_per_round,
)
from fedad.train.predictions import Predictions
from partitions import write_manifest


class ResultsWriter:
    """Writes one run's results folder, round by round, so an interrupted run leaves its history.

    Args:
        root: the folder (created if needed).
        resume: keep the rounds already recorded there (a resumed run); otherwise start afresh.
    """

    def __init__(self, root: Path, resume: bool = False) -> None:
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.plots = root / "plots"
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        for folder in (self.root, self.checkpoints, self.plots):
            folder.mkdir(parents=True, exist_ok=True)
        if resume and (root / "rounds.csv").exists():
            self.rows = pd.read_csv(root / "rounds.csv").to_dict("records")

    def write_setup(self, cfg: ExperimentConfig, manifest: pd.DataFrame) -> None:
        """The resolved config and the partition manifest."""
        cfg.to_yaml(self.root / "config.yaml")
        write_manifest(manifest, self.root / "partitions.csv")

    @property
    def last_round(self) -> int:
        """The last round recorded (0 when none)."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    def record_round(self, server_round: int, metrics: dict[str, float],
                     state: dict[str, torch.Tensor], strategy_state: dict | None = None) -> None:
        """Append a row to rounds.csv (scalar metrics only) and checkpoint the global model of
        this round, with the strategy's own state (e.g. ACA's per-client history)."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.rows = [r for r in self.rows if int(r["round"]) != server_round]
        self.rows.append({"round": server_round, **scalars})
        rows = [{k: int(v) if k == "round" else float(v) for k, v in row.items()}
                for row in self.rows]  # rounds.csv as of this checkpoint, restored on resume
        checkpoint = {"round": server_round, "state_dict": state,
                      "strategy": strategy_state or {}, "rows": rows}
        # latest.pt first: a run killed between the two files resumes from this round
        atomic_write(self.checkpoints / "latest.pt", lambda path: torch.save(checkpoint, path))
        atomic_write(self.checkpoints / f"round-{server_round:03d}.pt",
                lambda path: torch.save(checkpoint, path))
        atomic_write(self.root / "rounds.csv",
                lambda path: pd.DataFrame(self.rows).to_csv(path, index=False))

    def load_latest(self) -> tuple[int, dict[str, torch.Tensor], dict]:
        """(round, model state dict, strategy state) of the newest checkpoint; the recorded
        rounds become those of the checkpoint (a run killed between writing its checkpoint and
        rounds.csv loses no row)."""
        path = self.checkpoints / "latest.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        checkpoint = torch.load(path, weights_only=True)
        done = int(checkpoint["round"])
        self.rows = checkpoint.get("rows") or [r for r in self.rows if int(r["round"]) <= done]
        return done, checkpoint["state_dict"], checkpoint.get("strategy", {})

    def write_client_weights(self, rows: list[dict[str, Any]]) -> None:
        """aggregation_weights.csv (round, node, partition, weight and its factors) and its
        plot, when the strategy weighs clients adaptively."""
        if not rows:
            return
        table = pd.DataFrame(rows)
        table.to_csv(self.root / "aggregation_weights.csv", index=False)
        plot_client_weights(table, self.plots / "aggregation_weights.png")

    def write_scores(self, predictions: Predictions, defect_types: Sequence[str]) -> None:
        """scores.npz: the test split's labels [N], defect classes [N], calibrated image scores
        [N] and the scores the metrics rank [N] (ranking_scores) of the latest round (ROC curves
        and tables are rebuilt from it), and defect_types.csv: per defect type, the share
        flagged and the image AUROC against the good images."""
        np.savez(self.root / "scores.npz", labels=predictions.labels,
                 defect_classes=predictions.defect_classes,
                 image_scores=predictions.image_scores, ranking_scores=predictions.ranked())
        pd.DataFrame(defect_type_table(predictions.labels, predictions.defect_classes,
                                       predictions.image_scores, defect_types,
                                       ranking_scores=predictions.ranked())).to_csv(
            self.root / "defect_types.csv", index=False)

    def plot(self, server_round: int, predictions: Predictions) -> None:
        """Metrics-per-round curve and the anomaly-map grid of this round."""
        if self.rows:
            plot_metrics_per_round(pd.DataFrame(self.rows), self.plots / "metrics_per_round.png")
        idx = pick_grid_indices(predictions.labels)
        plot_anomaly_grid(
            predictions.images[idx], predictions.masks[idx], predictions.maps[idx],
            predictions.image_scores[idx], self.plots / "anomaly_maps.png",
            title=f"global model after round {server_round}",
        )

    def write_summary(self, cfg: ExperimentConfig, num_clients: int, extra: dict[str, Any],
                      final: dict[str, float] | None = None) -> dict:
        """summary.json: what ran, how long, and the last round's server-side metrics (plus
        ``final``, a method's end-of-run metrics)."""
        last = {**(self.rows[-1] if self.rows else {}), **(final or {})}
        final = {k: _json_number(v) for k, v in last.items()}
        summary = {
            "method": cfg.method, "strategy": cfg.strategy, "partitioner": cfg.partitioner,
            "num_clients": num_clients, "rounds": self.last_round,
            "seconds": round(time.perf_counter() - self.started, 2), "final": final, **extra,
        }
        (self.root / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file and a rename, so that a process killed midway
    leaves the previous version intact, never a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
