"""Sweep tables: one row per cell (runs.csv) and mean ± std over seeds (CSV, Markdown, LaTeX).

The centralized reference sits in the same table, first; the best mean of each metric column
among the federated rows is marked (bold), as the reference is not a competitor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from fedad.bench.spec import CENTRALIZED, NUM_CLIENTS, Cell, TableSpec
from fedad.bench.sweep import CELLS, cell_record, is_finished

STD = "±"


def collect_runs(out: str | Path, cells: list[Cell] | None = None) -> pd.DataFrame:
    """One row per cell of the sweep ``out``: its kind, swept params, status (``done`` |
    ``failed`` | ``incomplete`` | ``pending``), seconds, error and final metrics.

    Args:
        cells: the sweep's cells, in order; those without a folder yet are ``pending``
            (default: the cell folders found, sorted by name).
    """
    found = {p.name: p for p in sorted((Path(out) / CELLS).glob("*"))
             if (p / "cell.json").is_file()}
    records = {name: json.loads((folder / "cell.json").read_text())
               for name, folder in found.items()}
    for cell in cells or []:
        records.setdefault(cell.name, cell_record(cell))
    order = [c.name for c in cells or []]
    names = order + sorted(set(records) - set(order))
    return pd.DataFrame([_run_row(records[n], Path(out) / CELLS / n) for n in names])


def _run_row(cell: dict, folder: Path) -> dict:
    row = {"cell": cell["name"], "kind": cell["kind"], **cell["params"]}
    if is_finished(folder):
        summary = json.loads((folder / "summary.json").read_text())
        row.update(status="done", seconds=summary.get("seconds"), error="")
        row.update({k: v for k, v in summary.get("final", {}).items() if k != "round"})
    elif (folder / "error.json").is_file():
        error = json.loads((folder / "error.json").read_text())
        row.update(status="failed", seconds=math.nan, error=error["error"])
    elif folder.is_dir():
        row.update(status="incomplete", seconds=math.nan, error="running or interrupted")
    else:
        row.update(status="pending", seconds=math.nan, error="not run yet")
    return row


def param_columns(runs: pd.DataFrame) -> list[str]:
    """The swept keys among the columns of :func:`collect_runs` (between kind and status)."""
    columns = list(runs.columns)
    return columns[columns.index("kind") + 1: columns.index("status")]


def summarize(runs: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN for one seed) and seed count of each metric per row key (and
    column key), over the finished cells; the centralized reference first.

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
    stats["_ref"] = stats["kind"] != CENTRALIZED
    return stats.sort_values("_ref", kind="stable").drop(columns="_ref").reset_index(drop=True)


def display_table(summary: pd.DataFrame, table: TableSpec, fmt: str = "md",
                  digits: int = 3) -> pd.DataFrame:
    """The table as strings: row keys (renamed per ``table``), then ``mean ± std`` per metric
    (per column-key value when ``table.columns`` is set), best federated mean in bold.

    Args:
        fmt: ``md`` (``**x**``) or ``tex`` (``\\textbf{x}``, ``$\\pm$``, escaped headers).
    """
    metrics = [m for m in table.metrics if f"{m}_mean" in summary]
    rows = list(table.rows) if set(table.rows) & {"strategy", NUM_CLIENTS} else \
        ["kind", *table.rows]
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
        federated = merged["kind"] != CENTRALIZED if "kind" in merged else True
        for metric in metrics:
            mean, std = merged[f"{metric}_mean"], merged[f"{metric}_std"]
            best = mean[federated].max() if mean[federated].notna().any() else math.nan
            header = metric if group is None else (
                f"{table.values.get(table.columns, {}).get(str(group), group)} / "
                f"{table.labels.get(metric, metric)}")
            out[header] = [_cell_text(m, s, bool(m == best and f), fmt, digits)
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


def write_tables(out: str | Path, runs: pd.DataFrame, table: TableSpec,
                 title: str) -> dict[str, Path]:
    """runs.csv, table.csv (numeric mean/std/seeds), table.md and table.tex in ``out``.

    Args:
        runs: the sweep's cells (:func:`collect_runs`).

    Returns:
        the written paths by kind (``runs``, ``csv``, ``md``, ``tex``).
    """
    out = Path(out)
    paths = {k: out / name for k, name in (("runs", "runs.csv"), ("csv", "table.csv"),
                                           ("md", "table.md"), ("tex", "table.tex"))}
    runs.to_csv(paths["runs"], index=False)
    summary = summarize(runs, table)
    summary.to_csv(paths["csv"], index=False)
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    lines = [f"## {title}", "",
             f"cells: {len(runs)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
             "mean ± std over seeds; **bold**: best federated mean per column; "
             "the centralized reference (one client, all data) first.", ""]
    if len(summary):
        lines.append(display_table(summary, table, "md").to_markdown(index=False))
    failed = runs[runs["status"] != "done"] if len(runs) else runs
    if len(failed):
        lines += ["", "Not finished:", ""]
        lines += [f"- `{r.cell}`: {r.status}, {str(r.error).splitlines()[0]}"
                  for r in failed.itertuples()]
    paths["md"].write_text("\n".join(lines) + "\n")
    tex = display_table(summary, table, "tex").to_latex(index=False) if len(summary) else ""
    paths["tex"].write_text(tex)
    return paths
