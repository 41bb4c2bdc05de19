"""Rebuild tables and plots from a sweep folder or from one run's results folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedad.bench.plots import (
    plot_aggregation_weights,
    plot_anomaly_map_grids,
    plot_metric_per_round,
    plot_roc_curves,
    plot_run_roc,
)
from fedad.bench.spec import SweepError, SweepSpec, load_spec
from fedad.bench.tables import collect_runs, write_tables
from fedad.plots import plot_metrics_per_round


def is_sweep(folder: Path) -> bool:
    """True for a sweep folder (it holds the sweep.yaml that `fedad bench` copies there)."""
    return (folder / "sweep.yaml").is_file()


def sweep_report(out: str | Path, spec: SweepSpec | None = None) -> list[Path]:
    """Tables (runs.csv, table.csv/.md/.tex) and plots/ of the sweep folder ``out``.

    Args:
        spec: the sweep; default: the sweep.yaml saved in ``out``.

    Returns:
        the files written.
    """
    out = Path(out).expanduser().resolve()
    spec = spec or load_spec(out / "sweep.yaml")
    runs = collect_runs(out, spec.cells(), spec.table)
    if runs.empty:
        raise SweepError(f"{out}: no cells run yet")
    written = list(write_tables(out, runs, spec.table, spec.name).values())
    plots = out / "plots"
    jobs = [(plot_metric_per_round, (m,), plots / f"{m}_per_round.png")
            for m in spec.table.metrics]
    jobs += [(plot_roc_curves, (), plots / "roc.png"),
             (plot_aggregation_weights, (), plots / "aggregation_weights.png"),
             (plot_anomaly_map_grids, (), plots / "anomaly_maps.png")]
    for plot, args, path in jobs:
        if plot(out, runs, *args, path):
            written.append(path)
    return written


def run_report(results: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """Plots of one run's results folder: metrics per round and, when scores.npz is there,
    the image-level ROC curve.

    Returns:
        the rounds table and the plots written.
    """
    root = Path(results).expanduser().resolve()
    rounds_path = root / "rounds.csv"
    if not rounds_path.is_file():
        raise SweepError(f"{rounds_path}: not found (is {root} a fedad results folder or a "
                         "sweep folder?)")
    rounds = pd.read_csv(rounds_path)
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    written = [plots / "metrics_per_round.png"]
    plot_metrics_per_round(rounds, written[0])
    if plot_run_roc(root / "scores.npz", plots / "roc.png"):
        written.append(plots / "roc.png")
    return rounds, written
