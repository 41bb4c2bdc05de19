"""Sweep plots (PNG) from the cells' results folders: a metric per round per strategy, per-client
aggregation weights, ROC curves of the image scores, and the cells' anomaly-map grids.

Panels are the values of ``partitioner`` (when swept); each line is one setting of the other
swept keys, averaged over seeds for curves per round and taken from the lowest seed for ROC
curves, weights and anomaly maps. The centralized reference is drawn dashed in every panel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from fedad.bench.spec import CENTRALIZED
from fedad.bench.sweep import CELLS
from fedad.bench.tables import param_columns
from fedad.plots import save_figure

PANEL_KEY = "partitioner"


def _swept(runs: pd.DataFrame, params: list[str]) -> list[str]:
    """Params that take more than one value among ``runs`` (the ones worth naming)."""
    return [p for p in params if runs[p].astype(str).nunique() > 1]


def series_label(row: pd.Series, keys: list[str]) -> str:
    """``fedavg num-clients=4`` from the swept ``keys`` (``centralized`` for the reference)."""
    if row["kind"] == CENTRALIZED:
        return CENTRALIZED
    return " ".join(str(row[k]) if k == "strategy" else f"{k}={row[k]}" for k in keys)


def _panels(runs: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(panel title, federated rows of the panel plus the reference rows)."""
    done = runs[runs["status"] == "done"]
    reference = done[done["kind"] == CENTRALIZED]
    federated = done[done["kind"] != CENTRALIZED]
    if PANEL_KEY not in federated or federated.empty:
        yield "", done
        return
    for value, rows in federated.groupby(PANEL_KEY, sort=False):
        yield f"{PANEL_KEY}={value}", pd.concat([reference, rows])


def _series(rows: pd.DataFrame, runs: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    params = [c for c in param_columns(runs) if c not in (PANEL_KEY, "seed")]
    keys = sorted(_swept(runs[runs["kind"] != CENTRALIZED], params), key=lambda k: k != "strategy")
    labels = rows.apply(lambda r: series_label(r, keys), axis=1)
    yield from rows.groupby(labels, sort=False)


def _figure(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _style(label: str) -> dict:
    return {"linestyle": "--", "color": "black"} if label == CENTRALIZED else {}


def plot_metric_per_round(out: Path, runs: pd.DataFrame, metric: str, path: Path) -> bool:
    """``metric`` of the global model against the round, one line per strategy setting (mean
    over seeds), one panel per partitioner (cells without rounds.csv, the peers, left out).
    Returns False (no file) when no cell has it."""
    panels = list(_panels(runs))
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (title, rows) in zip(axes, panels, strict=True):
        for label, cells in _series(rows, runs):
            found = [out / CELLS / c / "rounds.csv" for c in cells["cell"]]
            curves = [pd.read_csv(path) for path in found if path.is_file()]
            curves = [c.set_index("round")[metric] for c in curves if metric in c]
            if curves:
                mean = pd.concat(curves, axis=1).mean(axis=1)
                ax.plot(mean.index, mean.values, marker="o", label=label, **_style(label))
                drawn = True
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    if drawn:
        axes[-1].legend(fontsize=7)
    return _save(fig, path, drawn)


def plot_roc_curves(out: Path, runs: pd.DataFrame, path: Path) -> bool:
    """Image-level ROC curves from each cell's scores.npz (labels [N], image_scores [N]) of
    the final global model, lowest seed per setting. Returns False when no cell has scores."""
    panels = list(_panels(runs))
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (title, rows) in zip(axes, panels, strict=True):
        for label, cells in _series(rows, runs):
            scores = out / CELLS / _lowest_seed(cells) / "scores.npz"
            drawn = draw_roc(ax, scores, label) or drawn
        _roc_axes(ax, title)
    return _save(fig, path, drawn)


def plot_run_roc(scores: Path, path: Path) -> bool:
    """Image-level ROC curve of one run's scores.npz (False, no file, when it has none)."""
    fig, axes = _figure(1)
    drawn = draw_roc(axes[0], scores, "global model")
    _roc_axes(axes[0], "image-level ROC, test split")
    return _save(fig, path, drawn)


def draw_roc(ax, scores: Path, label: str) -> bool:
    """Draw the ROC curve of ``scores`` (npz with labels [N] in {0,1} and image_scores [N], or
    the ranking_scores [N] the metrics rank where present) with its AUROC in the legend; False
    when the file is absent or has one class only."""
    if not scores.is_file():
        return False
    with np.load(scores) as data:
        key = "ranking_scores" if "ranking_scores" in data else "image_scores"
        labels, image_scores = data["labels"], data[key]
    if labels.shape != image_scores.shape or labels.ndim != 1:
        raise ValueError(f"{scores}: labels {labels.shape} and image_scores "
                         f"{image_scores.shape} must be the same 1-D shape")
    if len(np.unique(labels)) < 2 or not np.isfinite(image_scores).all():
        return False
    fpr, tpr, _ = roc_curve(labels, image_scores)
    auc = roc_auc_score(labels, image_scores)
    ax.plot(fpr, tpr, label=f"{label} ({auc:.3f})", **_style(label))
    return True


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot_aggregation_weights(out: Path, runs: pd.DataFrame, path: Path) -> bool:
    """Per-client aggregation weight per round of every setting whose cells wrote
    aggregation_weights.csv (columns round, node, partition, weight, ...), lowest seed."""
    found = []
    for _, rows in _panels(runs):
        for label, cells in _series(rows, runs):
            csv = out / CELLS / _lowest_seed(cells) / "aggregation_weights.csv"
            if csv.is_file():
                found.append((f"{label} {rows[PANEL_KEY].iloc[-1]}" if PANEL_KEY in rows
                              else label, pd.read_csv(csv)))
    if not found:
        return False
    fig, axes = _figure(len(found), width=3.6)
    for ax, (title, weights) in zip(axes, found, strict=True):
        key = "partition" if (weights["partition"] >= 0).all() else "node"
        for client, client_rows in weights.groupby(key):
            ax.plot(client_rows["round"], client_rows["weight"], marker="o",
                    label=f"{key} {client}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("aggregation weight")
    return _save(fig, path, True)


def plot_anomaly_map_grids(out: Path, runs: pd.DataFrame, path: Path,
                           max_rows: int = 24) -> bool:
    """The cells' plots/anomaly_maps.png stacked, one row per setting (lowest seed)."""
    found = []
    for _, rows in _panels(runs):
        for label, cells in _series(rows, runs):
            png = out / CELLS / _lowest_seed(cells) / "plots" / "anomaly_maps.png"
            title = f"{label} {rows[PANEL_KEY].iloc[-1]}" if PANEL_KEY in rows and \
                label != CENTRALIZED else label
            if png.is_file() and title not in dict(found):
                found.append((title, png))
    found = found[:max_rows]
    if not found:
        return False
    fig, axes = plt.subplots(len(found), 1, figsize=(10, 3.2 * len(found)), squeeze=False)
    for ax, (title, png) in zip(axes[:, 0], found, strict=True):
        ax.imshow(plt.imread(png))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _save(fig, path, True)


def _lowest_seed(cells: pd.DataFrame) -> str:
    if "seed" in cells:
        return str(cells.sort_values("seed")["cell"].iloc[0])
    return str(cells["cell"].iloc[0])


def _save(fig, path: Path, drawn: bool) -> bool:
    if drawn:
        save_figure(fig, path)
    else:
        plt.close(fig)
    return drawn
