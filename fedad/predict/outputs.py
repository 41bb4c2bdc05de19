"""What ``fedad predict`` writes: predictions.csv, per image an anomaly-map overlay and a
binary mask (PNG, at the file's own resolution), and a grid of the most anomalous images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from fedad.plots import save_figure

PREDICTIONS = "predictions.csv"
OVERLAYS, MASKS = "overlays", "masks"
GRID = "most_anomalous.png"
COLUMNS = ("path", "score", "decision", "defect_type", "raw_score", "overlay", "mask")
"""predictions.csv: the file, its calibrated image score in [0, 1], ``anomalous`` or
``normal`` at the image threshold, the predicted defect type (empty for a method that
predicts none), the uncalibrated score, and the overlay's and mask's files (relative)."""
ALPHA = 0.5
"""Opacity of the map over the image in overlays."""


def output_name(index: int, path: Path) -> str:
    """The PNG name of the ``index``-th scored image (unique: files of several folders may
    share a name)."""
    return f"{index:05d}-{path.stem}.png"


def map_at(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map [S, S] resized bilinearly to the file's (width, height) -> [height, width]."""
    if values.shape[::-1] == tuple(size):
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR))


def overlay(image: np.ndarray, values: np.ndarray) -> np.ndarray:
    """image [H, W, 3] in [0, 1] with the map [H, W] in [0, 1] over it (jet, ALPHA) ->
    uint8 [H, W, 3]."""
    colours = plt.get_cmap("jet")(np.clip(values, 0, 1))[..., :3]
    return np.round(255 * ((1 - ALPHA) * image + ALPHA * colours)).astype(np.uint8)


def write_image_outputs(out: Path, name: str, path: Path, values: np.ndarray,
                        pixel_threshold: float) -> tuple[str, str]:
    """The overlay and the binary mask (map >= ``pixel_threshold``) of one file, at its own
    resolution, from its calibrated map [S, S]; their paths relative to ``out``."""
    with Image.open(path) as opened:
        image = np.asarray(opened.convert("RGB"), dtype=np.float32) / 255
    full = map_at(values, (image.shape[1], image.shape[0]))
    files = (Path(OVERLAYS) / name, Path(MASKS) / name)
    Image.fromarray(overlay(image, full)).save(out / files[0])
    Image.fromarray(((full >= pixel_threshold) * 255).astype(np.uint8)).save(out / files[1])
    return str(files[0]), str(files[1])


def write_predictions(out: Path, rows: list[dict]) -> Path:
    """predictions.csv (:data:`COLUMNS`), one row per scored image, in input order."""
    path = out / PREDICTIONS
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)
    return path


def plot_most_anomalous(images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                        names: list[str], path: Path, title: str) -> Path:
    """A grid of images [N, S, S, 3] (top row) and their calibrated maps [N, S, S] over them
    (bottom row), titled with each one's name and score [N]."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(names[i], fontsize=6)
        axes[1, i].imshow(overlay(images[i], maps[i]))
        axes[1, i].set_title(f"{scores[i]:.3f}", fontsize=8)
    for ax, label in zip(axes[:, 0], ("image", "anomaly map"), strict=True):
        ax.set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, title)
