"""Figures of D-ADDA: synthesized defects with their masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedad.dadda.synthesis import DefectPairs
from fedad.plots import save_figure


def plot_synthesized(pairs: DefectPairs, defect_types: Sequence[str], path: str | Path,
                     title: str = "", per_class: int = 4) -> Path:
    """A PNG with, for up to ``per_class`` pairs of each class present, the image, its mask and
    the mask's outline on the image (three rows per column group). Returns ``path``."""
    pairs.check("plot_synthesized")
    if not len(pairs):
        raise ValueError("plot_synthesized: no pairs to plot")
    chosen = np.concatenate([np.flatnonzero(pairs.classes == c)[:per_class]
                             for c in np.unique(pairs.classes)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.6 * len(chosen), 5.2), squeeze=False)
    for column, index in enumerate(chosen):
        image, mask = pairs.images[index], pairs.masks[index]
        axes[0, column].imshow(image)
        axes[0, column].set_title(defect_types[pairs.classes[index]], fontsize=7)
        axes[1, column].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2, column].imshow(image)
        if mask.any():
            axes[2, column].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(("image", "mask", "overlay")):
        axes[row, 0].text(-0.1, 0.5, label, transform=axes[row, 0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    return save_figure(fig, path, title)
