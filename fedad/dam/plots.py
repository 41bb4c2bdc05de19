"""A visual check of DAM: normal image, defect source, new mask and result, one row each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedad.dam.augment import DAMSample, DefectAugmenter
from fedad.dam.settings import DAMSettings
from fedad.plots import save_figure

COLUMNS = ("normal", "defect source (mask)", "new mask", "result (new mask)")


def plot_dam_samples(
    samples: Sequence[DAMSample], normal_images: np.ndarray, defect_images: np.ndarray,
    defect_masks: np.ndarray, path: str | Path, title: str = "",
) -> Path:
    """Write a PNG with one row per sample and the columns of :data:`COLUMNS`.

    ``samples`` were made from ``normal_images`` / ``defect_images`` [N, H, W, 3] and
    ``defect_masks`` [M, H, W] (their indices point there). Returns ``path``.
    """
    if not samples:
        raise ValueError("plot_dam_samples: no samples to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(samples), 4, figsize=(8, 2.1 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples, strict=True):
        panels = (
            (normal_images[sample.normal_index], None),
            (defect_images[sample.defect_index], defect_masks[sample.defect_index]),
            (sample.mask, None),
            (sample.image, sample.mask),
        )
        for ax, (image, outline) in zip(row, panels, strict=True):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if outline is not None:
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
        verdict = "passed" if sample.passed else "kept after last try"
        row[3].set_xlabel(f"p={sample.fraction:.2f}, {sample.tries} tries, {verdict}", fontsize=7)
    for ax, name in zip(axes[0], COLUMNS, strict=True):
        ax.set_title(name, fontsize=8)
    return save_figure(fig, path, title)


def plot_dam_examples(
    normal_images: np.ndarray, defect_images: np.ndarray, defect_masks: np.ndarray,
    path: str | Path, *, kind: str, count: int = 4, seed: int = 0,
    settings: DAMSettings | None = None, title: str = "",
) -> Path:
    """Generate ``count`` DAM samples (same inputs as :func:`fedad.dam.augment_defects`) and
    plot them with :func:`plot_dam_samples`. Returns the PNG path."""
    augmenter = DefectAugmenter(
        normal_images, defect_images, defect_masks, kind=kind, settings=settings
    )
    samples = list(augmenter.generate(count, seed))
    return plot_dam_samples(samples, normal_images, defect_images, defect_masks, path, title)
