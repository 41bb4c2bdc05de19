"""Sweep tables: one row per cell (runs.csv) and mean ± std over seeds (CSV, Markdown, LaTeX).

The centralized reference sits in the same table, first; the best mean of each metric column
among the federated rows is marked (bold), as the reference is not a competitor. The report
options of a sweep file's ``table`` (:class:`fedad.bench.spec.TableSpec`) add derived columns
(``epsilon``: the (epsilon, delta) of the cell's DP settings; ``category_kind``: texture or
object; ``model_distance``: how far the final global model ends from the reference cell's),
"mean" rows over a row key, a count of wins of one swept value over another, scaled metrics.

Peer cells (anomalib models on the same images, :mod:`fedad.bench.peer`) sit after the
reference and, like it, do not compete for bold. Cost columns, usable as metrics:
``seconds`` (a fedad cell's whole federated run, a peer's whole run), ``peak_memory_mb`` (the
cell process's peak resident memory: cost.json of an in-process cell, a peer's summary),
``cell_seconds`` (an in-process cell's process), ``fit_seconds`` and ``test_seconds`` (peers);
``–`` where a cell kind has none. They are never scaled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedad.bench.cost import COST
from fedad.bench.spec import (
    CENTRALIZED,
    FEDERATED,
    MODEL_DISTANCE,
    NUM_CLIENTS,
    PEER,
    Cell,
    TableSpec,
)
from fedad.bench.sweep import CELLS, cell_record, cell_status
from fedad.config import ExperimentConfig
from fedad.data import SYNTHETIC_CATEGORIES
from fedad.privacy import DPSettings, privacy_epsilon

STD = "±"
MEAN = "mean"
"""The row-key value of the rows :attr:`TableSpec.mean_over` adds."""
COST_METRICS = frozenset({"seconds", "cell_seconds", "fit_seconds", "test_seconds",
                          "peak_memory_mb"})
"""What a cell cost (see the module docstring): lower is better, never scaled."""
LOWER_IS_BETTER = COST_METRICS | {MODEL_DISTANCE}
KIND_ORDER = (CENTRALIZED, PEER, FEDERATED)
"""Order of the cell kinds in tables: the references first."""
TOLD_APART_BY = {CENTRALIZED: {"strategy", NUM_CLIENTS}, PEER: {"method"}}
"""Row keys whose values tell a kind's rows from the federated ones."""
STATUS_NOTES = {"incomplete": "running or interrupted", "pending": "not run yet"}


def _epsilon(run_config: dict[str, Any]) -> float:
    """Epsilon (3 significant digits) of the cell's DP over its rounds; inf without DP."""
    cfg = ExperimentConfig.from_run_config(run_config)
    dp = cfg.section(DPSettings)
    if not dp.enabled:
        return math.inf
    epsilon = privacy_epsilon(dp.dp_noise_multiplier, cfg.num_server_rounds, dp.dp_delta)
    return float(f"{epsilon:.3g}")


def _category_kind(run_config: dict[str, Any]) -> str:
    """``texture`` or ``object`` for a built-in synthetic category, ``–`` otherwise."""
    return SYNTHETIC_CATEGORIES.get(str(run_config.get("category", "")), "–")


ROW_DERIVED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "epsilon": _epsilon, "category_kind": _category_kind}
"""Derived columns computed from a cell's run-config (usable as row keys)."""


def collect_runs(out: str | Path, cells: list[Cell] | None = None,
                 table: TableSpec | None = None) -> pd.DataFrame:
    """One row per cell of the sweep ``out``: its kind, swept params, status (see
    :func:`fedad.bench.sweep.cell_status`), seconds, error, final metrics, cost.json's values
    and the derived columns of ``table``.

    Args:
        cells: the sweep's cells, in order; those without a folder yet are ``pending``
            (default: the cell folders found, sorted by name).
        table: the table whose ``derived`` columns are added (default: none).
    """
    found = {p.name: p for p in sorted((Path(out) / CELLS).glob("*"))
             if (p / "cell.json").is_file()}
    records = {name: json.loads((folder / "cell.json").read_text())
               for name, folder in found.items()}
    for cell in cells or []:
        records.setdefault(cell.name, cell_record(cell))
    order = [c.name for c in cells or []]
    names = order + sorted(set(records) - set(order))
    derived = table.derived if table else ()
    runs = pd.DataFrame([_run_row(records[n], Path(out) / CELLS / n, derived) for n in names])
    if MODEL_DISTANCE in derived:
        runs[MODEL_DISTANCE] = model_distances(runs, records, Path(out) / CELLS, table.reference)
    return runs


def _run_row(cell: dict, folder: Path, derived: tuple[str, ...]) -> dict:
    status = cell_status(folder)
    row = {"cell": cell["name"], "kind": cell["kind"], **cell["params"], "status": status,
           "seconds": math.nan, "error": STATUS_NOTES.get(status, "")}
    if status == "done":
        summary = json.loads((folder / "summary.json").read_text())
        row["seconds"] = summary.get("seconds")
        row.update({k: v for k, v in summary.get("final", {}).items() if k != "round"})
        if (folder / COST).is_file():
            row.update(json.loads((folder / COST).read_text()))
    elif status == "failed":
        row["error"] = json.loads((folder / "error.json").read_text())["error"]
    row.update({k: ROW_DERIVED[k](cell["run_config"]) for k in derived if k in ROW_DERIVED})
    return row


@cache
def _last_two_models(folder: Path) -> tuple[torch.Tensor, ...]:
    """The global model's float parameters after the last two rounds (or fewer), flat."""
    checkpoints = sorted((folder / "checkpoints").glob("round-*.pt"))[-2:]
    states = [torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
              for p in checkpoints]
    return tuple(torch.cat([v.flatten().double() for v in state.values()
                            if v.is_floating_point()]) for state in reversed(states))


def model_distances(runs: pd.DataFrame, records: dict[str, dict], cells: Path,
                    reference: dict[str, Any]) -> list[float]:
    """||theta_cell - theta_ref|| of the final global models, in units of the reference's own
    last-round step ||theta_ref(T) - theta_ref(T-1)|| (0: the cell ends where the reference
    does; about 1: one round's progress away). The reference of a cell has ``reference``'s
    swept values and the cell's other ones; NaN where either has not finished or the
    reference ran a single round."""
    done = [n for n, s in zip(runs["cell"], runs["status"], strict=True) if s == "done"]
    distances = []
    for name in runs["cell"]:
        target = {**records[name]["params"], **reference}
        ref = next((n for n in done if records[n]["params"] == target), None)
        if name not in done or ref is None or len(_last_two_models(cells / ref)) < 2:
            distances.append(math.nan)
            continue
        final, before = _last_two_models(cells / ref)
        step = torch.linalg.norm(final - before)
        distances.append(float(torch.linalg.norm(_last_two_models(cells / name)[0] - final)
                               / step))
    _last_two_models.cache_clear()
    return distances


def param_columns(runs: pd.DataFrame) -> list[str]:
    """The swept keys among the columns of :func:`collect_runs` (between kind and status)."""
    columns = list(runs.columns)
    return columns[columns.index("kind") + 1: columns.index("status")]


def summarize(runs: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN for one seed) and seed count of each metric per row key (and
    column key), over the finished cells; the centralized reference first, then the peers, the
    ``mean`` rows of ``table.mean_over`` (the mean of the row means over its values; no std)
    last.

    Returns:
        columns ``kind``, the row keys, the column key if any, ``seeds``, and
        ``<metric>_mean`` / ``<metric>_std`` for each metric of ``table``.
    """
    done = runs[runs["status"] == "done"].copy() if len(runs) else runs
    keys = ["kind", *table.rows, *([table.columns] if table.columns else [])]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "seeds"])
    for key in keys:
        done[key] = done[key].astype(str)
    metrics = [m for m in table.metrics if m in done]
    for metric in metrics:
        done[metric] = pd.to_numeric(done[metric], errors="coerce")
    grouped = done.groupby(keys, sort=False)
    stats = grouped.size().rename("seeds").to_frame()
    for metric in metrics:
        stats[f"{metric}_mean"] = grouped[metric].mean()
        stats[f"{metric}_std"] = grouped[metric].std(ddof=1)
    stats = stats.reset_index()
    stats["_order"] = stats["kind"].map(KIND_ORDER.index)
    stats = stats.sort_values("_order", kind="stable").drop(columns="_order")
    if table.mean_over:
        means = [f"{m}_mean" for m in metrics]
        others = [k for k in keys if k != table.mean_over]
        overall = stats.groupby(others, sort=False)[means].mean().reset_index()
        stats = pd.concat([stats, overall.assign(**{table.mean_over: MEAN})])
    return stats.reset_index(drop=True)


def display_table(summary: pd.DataFrame, table: TableSpec, fmt: str = "md") -> pd.DataFrame:
    """The table as strings: row keys (renamed per ``table``; ``kind`` first when the
    centralized reference or peers are there and no row key tells them apart), then ``mean ±
    std`` per metric (per column-key value when ``table.columns`` is set; times
    ``table.scale`` but for :data:`COST_METRICS`, with ``table.digits`` decimals), best
    federated mean in bold (the lowest for :data:`LOWER_IS_BETTER`; ``mean`` rows do not
    compete).

    Args:
        fmt: ``md`` (``**x**``) or ``tex`` (``\\textbf{x}``, ``$\\pm$``, escaped headers).
    """
    metrics = [m for m in table.metrics if f"{m}_mean" in summary]
    named = all(set(table.rows) & TOLD_APART_BY[kind]
                for kind in set(summary["kind"]) - {FEDERATED})
    rows = list(table.rows) if named else ["kind", *table.rows]
    groups: list = [None]
    if table.columns:  # in the order of the column key's labels in ``values``, then as found
        labelled = list(table.values.get(table.columns, {}))
        groups = sorted(dict.fromkeys(summary[table.columns]),
                        key=lambda g: (labelled.index(str(g)) if str(g) in labelled
                                       else len(labelled)))
    index = summary[rows].drop_duplicates().reset_index(drop=True)
    out = index.copy()
    for key in rows:
        renames = table.values.get(key, {})
        out[key] = index[key].map(lambda v, r=renames: r.get(str(v), str(v)))
        if fmt == "tex":
            out[key] = out[key].map(_tex_escape)
    for group in groups:
        part = summary if group is None else summary[summary[table.columns] == group]
        merged = index.merge(part, on=rows, how="left")
        federated = merged["kind"] == FEDERATED if "kind" in merged else True
        if table.mean_over:
            federated = federated & (merged[table.mean_over] != MEAN)
        for metric in metrics:
            scale = 1.0 if metric in COST_METRICS else table.scale
            mean = merged[f"{metric}_mean"] * scale
            std = merged[f"{metric}_std"] * scale
            ranked = mean[federated]
            best = (ranked.min() if metric in LOWER_IS_BETTER else ranked.max()) \
                if ranked.notna().any() else math.nan
            header = metric if group is None else (
                f"{table.values.get(table.columns, {}).get(str(group), group)} / "
                f"{table.labels.get(metric, metric)}")
            out[header] = [_cell_text(m, s, bool(m == best and f), fmt, table.digits)
                           for m, s, f in zip(mean, std, _as_list(federated, len(merged)),
                                              strict=True)]
    out = out.rename(columns={k: table.labels.get(k, k) for k in out.columns})
    if fmt == "tex":
        out.columns = [_tex_escape(str(c)) for c in out.columns]
    return out


def _as_list(value: pd.Series | bool, n: int) -> list[bool]:
    return value.tolist() if isinstance(value, pd.Series) else [value] * n


def _cell_text(mean: float, std: float, best: bool, fmt: str, digits: int) -> str:
    if not isinstance(mean, float) or math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if not math.isnan(std):
        text += f" $\\pm$ {std:.{digits}f}" if fmt == "tex" else f" {STD} {std:.{digits}f}"
    if best:
        text = f"\\textbf{{{text}}}" if fmt == "tex" else f"**{text}**"
    return text


def _tex_escape(text: str) -> str:
    for char in ("\\", "&", "%", "#", "_", "{", "}"):
        text = text.replace(char, "\\" + char)
    return text


def compare_table(runs: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """For ``table.compare = (key, value, baseline)``: on each metric, in how many pairs of
    finished federated cells that differ only in ``key`` (e.g. the same category and seed) the
    ``value`` cell beats the ``baseline`` one (``wins / pairs``); one row."""
    key, value, baseline = table.compare
    done = runs[(runs["status"] == "done") & (runs["kind"] == FEDERATED)]
    others = [c for c in param_columns(runs) if c != key] or ["kind"]
    metrics = [m for m in table.metrics if m in done]
    frame = done.assign(**{c: done[c].astype(str) for c in [key, *others]})
    frame[metrics] = frame[metrics].apply(pd.to_numeric, errors="coerce")
    paired = frame.groupby([*others, key])[metrics].mean().unstack(key)
    row: dict[str, str] = {"": f"{value} > {baseline}"}
    for metric in metrics:
        if (metric, value) not in paired or (metric, baseline) not in paired:
            row[metric] = "0 / 0"
            continue
        both = paired[[(metric, value), (metric, baseline)]].dropna()
        ours, theirs = both[(metric, value)], both[(metric, baseline)]
        wins = (ours < theirs) if metric in LOWER_IS_BETTER else (ours > theirs)
        row[metric] = f"{int(wins.sum())} / {len(both)}"
    return pd.DataFrame([row]).rename(columns=table.labels)


def write_tables(out: str | Path, runs: pd.DataFrame, table: TableSpec,
                 title: str) -> dict[str, Path]:
    """runs.csv, table.csv (numeric mean/std/seeds), table.md and table.tex in ``out``, and
    compare.csv (:func:`compare_table`, also in table.md) when ``table.compare`` is set.

    Args:
        runs: the sweep's cells (:func:`collect_runs`).

    Returns:
        the written paths by kind (``runs``, ``csv``, ``md``, ``tex``, ``compare``).
    """
    out = Path(out)
    paths = {k: out / name for k, name in (("runs", "runs.csv"), ("csv", "table.csv"),
                                           ("md", "table.md"), ("tex", "table.tex"))}
    runs.to_csv(paths["runs"], index=False)
    summary = summarize(runs, table)
    summary.to_csv(paths["csv"], index=False)
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    kinds = set(runs.get("kind", ()))
    lines = [f"## {title}", "",
             f"cells: {len(runs)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
             "mean ± std over seeds; **bold**: best federated mean per column"
             + ("; the centralized reference (one client, all data) first"
                if CENTRALIZED in kinds else "")
             + ("; peers: anomalib models on the same images and backbone (docs/peers.md)"
                if PEER in kinds else "")
             + (f"; metrics x {table.scale:g}." if table.scale != 1 else "."), ""]
    if len(summary):
        lines.append(display_table(summary, table, "md").to_markdown(index=False))
    if table.compare and len(summary):
        paths["compare"] = out / "compare.csv"
        compare = compare_table(runs, table)
        compare.to_csv(paths["compare"], index=False)
        lines += ["", f"Pairs of cells that differ only in {table.compare[0]}:", "",
                  compare.to_markdown(index=False)]
    failed = runs[runs["status"] != "done"] if len(runs) else runs
    if len(failed):
        lines += ["", "Not finished:", ""]
        lines += [f"- `{r.cell}`: {r.status}, {str(r.error).splitlines()[0]}"
                  for r in failed.itertuples()]
    paths["md"].write_text("\n".join(lines) + "\n")
    tex = display_table(summary, table, "tex").to_latex(index=False) if len(summary) else ""
    paths["tex"].write_text(tex)
    return paths
