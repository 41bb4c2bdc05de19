"""report.html: one self-contained page of a run's or a sweep's folder, readable offline (the
plots embedded as base64 PNG, the style inline, no external link or script).

A run's page: its summary (with the decision thresholds of ``thresholds.json``), the rounds
and per-defect-type tables, every plot of ``plots/`` (metrics per round, ROC curve,
anomaly-map grid, ...), the privacy settings and a summary of what crossed to the server
(``payloads.jsonl``), and the config. A sweep's page: its table
(mean ± std over seeds, best federated mean in bold), its cells, its plots and what crossed
in each cell. ``fedad report`` writes it after the tables and plots.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from fedad.attacks import AttackSettings
from fedad.bench.report import is_sweep
from fedad.bench.spec import load_spec
from fedad.bench.sweep import CELLS
from fedad.bench.tables import display_table
from fedad.config import ExperimentConfig
from fedad.metrics import METRIC_NAMES
from fedad.payloads import AUDIT_FILE
from fedad.privacy import DPSettings, privacy_epsilon
from fedad.thresholds import SCALES, THRESHOLDS_FILE

REPORT = "report.html"
PLOT_ORDER = ("metrics_per_round", "roc", "anomaly_maps", "aggregation_weights")
"""Plots shown first, in this order (a sweep's ``<metric>_per_round`` with the first; the
others follow by name)."""
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc;
     margin-top: 1.8em; } .meta { color: #666; }
nav a { margin-right: 1em; color: #2a5db0; text-decoration: none; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def write_html_report(folder: str | Path) -> Path:
    """Write ``folder``/report.html for a run's results folder or a sweep folder (after
    ``fedad report`` wrote its tables and plots); returns its path."""
    folder = Path(folder).expanduser().resolve()
    title, sections = _sweep(folder) if is_sweep(folder) else _run(folder)
    nav = "".join(f'<a href="#{_anchor(name)}">{html.escape(name)}</a>' for name, _ in sections)
    body = "".join(f'<h2 id="{_anchor(name)}">{html.escape(name)}</h2>{content}'
                   for name, content in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(str(folder))} · "
            f"report written {time.strftime('%Y-%m-%d %H:%M')}</p><nav>{nav}</nav>{body}"
            "</body></html>\n")
    path = folder / REPORT
    path.write_text(page)
    return path


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_html(frame: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as an HTML table (escaped; floats with ``digits`` decimals, ``**x**`` as
    bold)."""
    text = frame.to_html(index=False, border=0, na_rep="–", escape=True,
                         float_format=lambda v: f"{v:.{digits}f}")
    bold = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return f'<div class="wide">{bold}</div>'


def image_html(path: Path, caption: str) -> str:
    """A PNG embedded as a base64 data URI, with its caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def plots_html(folder: Path) -> str:
    """Every PNG of ``folder`` (:data:`PLOT_ORDER` first), embedded."""
    def rank(path: Path) -> int:
        stem = "metrics_per_round" if path.stem.endswith("_per_round") else path.stem
        return PLOT_ORDER.index(stem) if stem in PLOT_ORDER else len(PLOT_ORDER)

    plots = sorted(folder.glob("*.png"), key=lambda p: (rank(p), p.name))
    return "".join(image_html(p, p.stem.replace("_", " ")) for p in plots) or "<p>none</p>"


def audit_rows(path: Path) -> pd.DataFrame:
    """The rows of an audit log (``payloads.jsonl``), with the columns the report reads
    (``round``, ``node``, ``kind``, ``accepted``, ``reason``, ``count``, ``bytes``) also where
    an older log lacks one."""
    rows = pd.read_json(path, lines=True) if path.stat().st_size else pd.DataFrame()
    defaults = {"round": 0, "node": 0, "kind": "", "accepted": True, "reason": "",
                "count": None, "bytes": 0}
    for column, value in defaults.items():
        if column not in rows:
            rows[column] = value
    rows["accepted"] = rows["accepted"].astype(bool)
    rows["bytes"] = pd.to_numeric(rows["bytes"], errors="coerce").fillna(0)
    rows["count"] = pd.to_numeric(rows["count"], errors="coerce")
    return rows


def payload_summary(path: Path) -> pd.DataFrame:
    """Per kind of payload in an audit log (``payloads.jsonl``): rows, accepted, refused,
    rounds, examples summarised (count) and MiB of arrays."""
    rows = audit_rows(path)
    if rows.empty:
        return pd.DataFrame(columns=["kind", "rows", "accepted", "refused", "rounds",
                                     "examples", "MiB"])
    grouped = rows.groupby("kind", sort=False)
    return pd.DataFrame({
        "rows": grouped.size(), "accepted": grouped["accepted"].sum(),
        "refused": grouped["accepted"].apply(lambda a: int((~a).sum())),
        "rounds": grouped["round"].agg(lambda r: f"{r.min()}–{r.max()}" if r.min() != r.max()
                                       else str(r.min())),
        "examples": grouped["count"].sum(min_count=1),
        "MiB": grouped["bytes"].sum() / 2**20,
    }).reset_index()


def _refused(path: Path) -> str:
    """The refused rows of an audit log (round, node, kind, reason), or a line saying none."""
    rows = audit_rows(path)
    if rows["accepted"].all():
        return "<p>No payload was refused.</p>"
    refused = rows[~rows["accepted"]][["round", "node", "kind", "reason"]]
    return "<p>Refused (never aggregated):</p>" + table_html(refused)


def privacy_html(cfg: ExperimentConfig, rounds: int) -> str:
    """The differential-privacy and Byzantine-site settings of a run (all of a section that is
    on), and its (epsilon, delta) after ``rounds``."""
    dp, attack = cfg.section(DPSettings), cfg.section(AttackSettings)
    values = {**(asdict(dp) if dp.enabled else {"dp": dp.dp}),
              **(asdict(attack) if attack.attack != "none" else {"attack": attack.attack})}
    epsilon = (f"{privacy_epsilon(dp.dp_noise_multiplier, max(rounds, 1), dp.dp_delta):.3g} "
               f"after {rounds} rounds" if dp.enabled else "inf (no differential privacy)")
    return table_html(pd.DataFrame(
        [{"setting": k.replace("_", "-"), "value": str(v)} for k, v in values.items()]
        + [{"setting": f"epsilon (delta={dp.dp_delta:g})", "value": epsilon}]))


def thresholds_html(path: Path) -> str:
    """The decision thresholds of a run's thresholds.json (:mod:`fedad.thresholds`) with their
    error bounds, and the test split's F1-max image threshold next to them."""
    saved = json.loads(path.read_text())
    rows = [{"scale": name, "threshold": saved[name]["threshold"],
             "error bound (bin width)": saved[name]["error_bound"],
             "normal values": saved[name]["normal_values"],
             "normal FPR": saved[name]["normal_fpr"]} for name in SCALES]
    text = (f"<p>Decision thresholds ({THRESHOLDS_FILE}): at threshold-fpr="
            f"{saved['threshold_fpr']:g} on {saved['normal_images']} held-out normal images of "
            f"{len(saved['sites'])} sites:</p>" + table_html(pd.DataFrame(rows), 6))
    test = saved.get("test_f1_max")
    if test:
        text += (f"<p>The test split's F1-max image threshold, reported, never used: "
                 f"{test['image_threshold']:.6g} (F1 {test['image_f1']:.4f}; at the "
                 f"federated threshold {test['image_f1_at_threshold']:.4f}).</p>")
    return text


def _run(root: Path) -> tuple[str, list[tuple[str, str]]]:
    """Title and sections of a run's page."""
    summary = json.loads((root / "summary.json").read_text()) \
        if (root / "summary.json").is_file() else {}
    cfg = ExperimentConfig.from_yaml(root / "config.yaml") \
        if (root / "config.yaml").is_file() else None
    method = summary.get("method") or (cfg.method if cfg else "run")
    title = " · ".join(str(v) for v in (method, summary.get("strategy"),
                                         summary.get("partitioner")) if v)
    facts = {k: summary[k] for k in ("method", "strategy", "partitioner", "num_clients",
                                     "rounds", "seconds") if k in summary}
    overview = table_html(pd.DataFrame([{"run": k, "value": str(v)} for k, v in facts.items()]))
    if summary.get("final"):
        final = {k: v for k, v in summary["final"].items() if k in METRIC_NAMES}
        overview += "<p>The last round's global model on the test split:</p>" + table_html(
            pd.DataFrame([final]))
    if (root / THRESHOLDS_FILE).is_file():
        overview += thresholds_html(root / THRESHOLDS_FILE)
    sections = [("Summary", overview if facts or summary else "<p>no summary.json (the run "
                 "has not finished)</p>")]
    for name, label in (("rounds.csv", "Rounds"), ("defect_types.csv", "Per defect type")):
        if (root / name).is_file():
            sections.append((label, table_html(pd.read_csv(root / name))))
    sections.append(("Plots", plots_html(root / "plots")))
    crossed = ""
    if cfg is not None:
        crossed += privacy_html(cfg, int(summary.get("rounds") or cfg.num_server_rounds))
    audit = root / AUDIT_FILE
    if audit.is_file():
        crossed += (f"<p>What reached the server ({AUDIT_FILE}, one row per payload):</p>"
                    + table_html(payload_summary(audit), 3) + _refused(audit))
    sections.append(("Privacy and payloads", crossed or "<p>none recorded</p>"))
    if (root / "config.yaml").is_file():
        sections.append(("Configuration", "<details><summary>config.yaml</summary><pre>"
                         f"{html.escape((root / 'config.yaml').read_text())}</pre></details>"))
    return title or root.name, sections


def _sweep(out: Path) -> tuple[str, list[tuple[str, str]]]:
    """Title and sections of a sweep's page."""
    spec = load_spec(out / "sweep.yaml")
    sections = []
    if (out / "table.csv").is_file():
        summary = pd.read_csv(out / "table.csv", keep_default_na=False, na_values=[""])
        sections.append(("Table", "<p>Mean ± std over seeds; bold: the best federated mean "
                         "per column.</p>" + table_html(display_table(summary, spec.table))))
    runs = pd.read_csv(out / "runs.csv") if (out / "runs.csv").is_file() else pd.DataFrame()
    if len(runs):
        shown = [c for c in runs.columns if c in ("cell", "kind", "status", *spec.table.metrics)]
        sections.append(("Cells", table_html(runs[shown])))
    sections.append(("Plots", plots_html(out / "plots")))
    crossed = []
    for cell in runs.get("cell", []):
        audit = out / CELLS / str(cell) / AUDIT_FILE
        if audit.is_file():
            totals = payload_summary(audit)
            crossed.append({"cell": cell, "payloads": int(totals["rows"].sum()),
                            "refused": int(totals["refused"].sum()),
                            "MiB": float(totals["MiB"].sum())})
    sections.append(("Payloads per cell", table_html(pd.DataFrame(crossed), 3) if crossed
                     else "<p>no cell has an audit log</p>"))
    return f"sweep {spec.name}", sections
