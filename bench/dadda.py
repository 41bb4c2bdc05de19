"""D-ADDA on one category with the CPU defaults: DAM-only vs D-ADDA (Table II layout), the
run's U-Pro / F-Pro defect-type accuracy (Table III layout) and the time of every stage.

Runs every stage on the in-process grid (the same site and server code as `flwr run`, without
the simulation's processes), once per synthesis mode, and prints Markdown tables.

    OMP_NUM_THREADS=2 python bench/dadda.py --out ~/fedad-results/bench-dadda \
        [--category brick] [--partitioner label-wise] [--clients 4] [--synthesis dam-only] \
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd

from fedad.config import ExperimentConfig
from fedad.dadda.settings import SYNTHESIS
from fedad.dadda.workflow import run_dadda
from fedad.inprocess import InProcessGrid

BASE = {"method": "dadda", "image-size": 64, "num-server-rounds": 3, "local-epochs": 2,
        "batch-size": 8, "lr": 0.002, "val-fraction": 0.0, "plot-every-round": False}
"""Detector side of the CPU default (the dadda-* keys keep their defaults)."""


def _value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--partitioner", default="label-wise")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--synthesis", nargs="+", choices=SYNTHESIS, default=["dam-only", "dadda"],
                        help="synthesis modes to run (default: both)")
    parser.add_argument("--set", nargs="*", default=[], help="extra run-config key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    extra = dict(item.split("=", 1) for item in args.set)
    table_ii, table_iii, stages = [], [], []
    for synthesis in args.synthesis:
        folder = args.out / synthesis
        cfg = ExperimentConfig.from_run_config({
            **BASE, "category": args.category, "partitioner": args.partitioner,
            "min-train-nodes": args.clients, "results-dir": str(folder),
            "dadda-synthesis": synthesis,
            "dadda-cache-dir": str(args.out / "cache"),
            **{k: _value(v) for k, v in extra.items()}})
        start, cpu = time.perf_counter(), time.process_time()
        summary = run_dadda(InProcessGrid(cfg, args.clients), cfg)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        table_ii.append(pd.read_csv(folder / "table_ii.csv"))
        table_iii.append(pd.read_csv(folder / "table_iii.csv"))
        stages.append({"Synthesis": synthesis, **{k: round(v, 1) for k, v in
                                                   summary["stage_seconds"].items()},
                       "total": round(total, 1), "cpu": round(cpu, 1)})
        (folder / "bench.json").write_text(json.dumps(summary, indent=2, default=str))
    for title, frames in (("Table II layout (%, last round)", table_ii),
                          ("Table III layout (%, this run)", table_iii),
                          ("Stage wall times and total process CPU time (s)",
                           [pd.DataFrame(stages)])):
        print(f"\n### {title}\n")
        print(pd.concat(frames).to_markdown(index=False, floatfmt=".1f"))


if __name__ == "__main__":
    main()
