"""PNG plots of a run: metrics per round and a grid of anomaly maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from fedad.metrics import METRIC_NAMES


def save_figure(fig, path: Path, title: str | None = None) -> Path:
    """Optional suptitle, tight layout, write ``path`` as PNG (110 dpi, folders made), close."""
    if title:
        fig.suptitle(title, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_metrics_per_round(rounds: pd.DataFrame, path: Path) -> None:
    """Every metric of ``rounds`` (one row per round, column ``round``) against the round."""
    columns = [c for c in METRIC_NAMES if c in rounds and rounds[c].notna().any()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in columns:
        ax.plot(rounds["round"], rounds[column], marker="o", label=column)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Global model on the test split")
    save_figure(fig, path)


def plot_anomaly_grid(
    images: np.ndarray, masks: np.ndarray, maps: np.ndarray, scores: np.ndarray,
    path: Path, title: str = "", max_images: int = 8,
) -> None:
    """Rows: image, ground truth, predicted map (with its image score) for a few test images.

    Args:
        images: [N, H, W, 3] in [0,1]; masks: [N, H, W]; maps: [N, H, W]; scores: [N].
    """
    n = min(max_images, len(images))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[1, i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[2, i].imshow(images[i])
        axes[2, i].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[2, i].set_title(f"{scores[i]:.2f}", fontsize=8)
    for ax, label in zip(axes[:, 0], ("image", "ground truth", "anomaly map"), strict=True):
        ax.set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path, title)


def pick_grid_indices(labels: np.ndarray, n: int = 8) -> np.ndarray:
    """Indices of ``n`` test images, defects and normals interleaved, deterministic."""
    defects = np.flatnonzero(labels > 0)
    normals = np.flatnonzero(labels == 0)
    take_d = defects[np.linspace(0, len(defects) - 1, min(len(defects), n - n // 4)).astype(int)]
    count_n = min(len(normals), n - len(take_d))
    take_n = normals[np.linspace(0, len(normals) - 1, count_n).astype(int)]
    return np.concatenate([take_d, take_n]) if len(defects) else take_n


def plot_client_weights(weights: pd.DataFrame, path: Path) -> None:
    """Each client's aggregation weight against the round.

    Args:
        weights: rows with columns ``round``, ``weight`` and ``partition`` (or ``node``).
    """
    key = "partition" if "partition" in weights and (weights["partition"] >= 0).all() else "node"
    fig, ax = plt.subplots(figsize=(6, 4))
    for client, rows in weights.groupby(key):
        ax.plot(rows["round"], rows["weight"], marker="o", label=f"{key} {client}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("aggregation weight")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Adaptive Client Aggregation: weight per client")
    save_figure(fig, path)
