"""Wall time of every method's CPU default, end to end, on the built-in synthetic data.

The targets of the GPU-and-speed issue: ``method=dadda`` at its CPU default with 3 label-wise
sites within 10 minutes on 2 cores, every other method within 5 minutes at the size of
``make demo`` (4 IID sites, each method's own rounds and settings). Every method of
fedad.methods.METHODS is run (the registry is read at run time); :data:`SITES` gives the
methods whose sites are not 4 IID ones.

Each run is the in-process runner of ``fedad bench`` (the sites one after another in this
process, torch's threads shared: what `flwr run` does less its Ray start-up) with
``device=cpu``, into a temporary results folder; ``--repeats`` runs per method give the median.
Stage times come from the run's own records: D-ADDA's ``stage_seconds`` (summary.json) and,
where rounds.csv has it, the sites' local training per round (``train_seconds``, median over
rounds). The load average beside each row says how shared the machine was.

    python bench/perf_defaults.py --repeats 1 --out /tmp/perf_defaults.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedad.config import ExperimentConfig
from fedad.inprocess import run_in_process
from fedad.methods import METHODS

SITES: dict[str, dict[str, object]] = {
    "dadda": {"partitioner": "label-wise", "sites": 3, "target_s": 600},
}
"""Methods run on other sites than :data:`DEFAULT_SITES`."""
DEFAULT_SITES: dict[str, object] = {"partitioner": "iid", "sites": 4, "target_s": 300}


def run_once(method: str, folder: Path, seed: int, overrides: dict[str, str]
             ) -> dict[str, float]:
    """One run of ``method`` at its defaults (less ``overrides``, run-config strings) into
    ``folder``: wall seconds, rounds and stage seconds (D-ADDA's stages; the sites' local
    training per round)."""
    case = {**DEFAULT_SITES, **SITES.get(method, {})}
    cfg = ExperimentConfig.from_run_config({
        "method": method, "partitioner": case["partitioner"], "device": "cpu", "seed": seed,
        "results-dir": str(folder), "plot-every-round": False, **overrides})
    start = time.perf_counter()
    summary = run_in_process(cfg, int(case["sites"]))
    out = {"wall_s": time.perf_counter() - start, "rounds": float(summary["rounds"])}
    out.update({f"{k}_s": v for k, v in summary.get("stage_seconds", {}).items()})
    rounds = folder / "rounds.csv"
    if rounds.is_file() and "train_seconds" in (table := pd.read_csv(rounds)):
        out["site_training_per_round_s"] = float(table["train_seconds"].median())
    return out


def measure(methods: list[str], repeats: int, overrides: dict[str, str]) -> pd.DataFrame:
    """A row per method: sites, the median of each time over ``repeats`` runs, the target
    and the load average seen."""
    rows = []
    for method in methods:
        case = {**DEFAULT_SITES, **SITES.get(method, {})}
        runs = []
        for repeat in range(repeats):
            with tempfile.TemporaryDirectory() as folder:
                runs.append(run_once(method, Path(folder), repeat, overrides))
            print(f"{method} run {repeat + 1}/{repeats}: {runs[-1]['wall_s']:.0f} s", flush=True)
        times = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        rows.append({"method": method, "sites": f"{case['sites']} {case['partitioner']}",
                     "runs": repeats, **{k: round(v, 1) for k, v in times.items()},
                     "target_s": case["target_s"],
                     "within": "yes" if times["wall_s"] <= case["target_s"] else "no",
                     "load_1min": round(os.getloadavg()[0], 1)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list (default: every registered method)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value for every run (not the defaults any more)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not among {', '.join(METHODS)}")
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set {bad[0]!r}: expected KEY=VALUE")
    overrides = dict(item.split("=", 1) for item in args.set)
    table = measure(methods, args.repeats, overrides)
    text = (f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads shared by the sites, overrides {overrides or 'none'}\n\n"
            f"{table.to_markdown(index=False)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(table.to_dict("records")))


if __name__ == "__main__":
    main()
