"""Fed-MSVT benchmark: FedAvg, FedProx, ACA, CFA, ACA+CFA and the centralized reference under
IID, label-wise and Dirichlet partitions, several seeds, the same budget (rounds x local epochs).

Each run is the real server workflow and site code on an in-process grid (fedad.inprocess: no
Ray, same messages). Runs are resumable: a run whose results folder has summary.json is read,
not rerun. Also times each strategy's aggregate_train on the same MSVT-sized replies.

    python bench/fed_msvt.py --out ~/fedad-bench/fed-msvt-wood64     # the table in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedad.config import ExperimentConfig
from fedad.experiment import prepare_data
from fedad.inprocess import InProcessGrid, run_in_process
from fedad.task import build_model, model_to_arrays
from strategies import build_strategy

STRATEGIES = ("fedavg", "fedprox", "aca", "cfa", "fedmsvt")
PARTITIONERS = ("iid", "label-wise", "dirichlet")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_cell(base: dict, out: Path, strategy: str, partitioner: str, seed: int,
             num_sites: int) -> dict:
    """One run's final metrics (read from its summary.json when it already finished)."""
    name = f"{strategy}-{partitioner}-s{seed}" if num_sites > 1 else f"centralized-s{seed}"
    folder = out / name
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    cfg = ExperimentConfig.from_run_config({
        **base, "strategy": strategy, "partitioner": partitioner, "seed": seed,
        "min-train-nodes": num_sites, "results-dir": str(folder)})
    return run_in_process(cfg, num_sites)


def aggregation_times(base: dict, num_sites: int, repeats: int) -> pd.DataFrame:
    """Median aggregate_train time of each strategy on the same replies, and its ratio to FedAvg.

    Replies: the trainable MSVT arrays plus noise, with the metrics ACA and CFA read.
    """
    cfg = ExperimentConfig.from_run_config(base)
    arrays = model_to_arrays(build_model(cfg))
    rng = np.random.default_rng(0)
    grid = InProcessGrid(cfg, num_sites)
    replies = []
    for node in grid.get_node_ids():
        values = [a.numpy() + rng.normal(0, 1e-3, a.shape).astype(a.numpy().dtype)
                  for a in arrays.values()]
        record = ArrayRecord(dict(zip(arrays.keys(), map(torch.from_numpy, values), strict=True)))
        metrics = MetricRecord({"num-examples": 20, "val_pixel_accuracy": 0.95,
                                "partition": node, "prototype": rng.normal(size=128).tolist()})
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=sent))
    rows = []
    for name in STRATEGIES:
        times = []
        for _ in range(repeats):
            strategy = build_strategy(cfg.replace(strategy=name))
            list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
            start = time.perf_counter()
            strategy.aggregate_train(1, replies)
            times.append(time.perf_counter() - start)
        rows.append({"strategy": name, "median_ms": 1000 * statistics.median(times)})
    table = pd.DataFrame(rows)
    table["ratio_to_fedavg"] = table["median_ms"] / table.loc[0, "median_ms"]
    return table


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """mean ± std over seeds per (strategy, partitioner), one column per metric."""
    grouped = runs.groupby(["strategy", "partitioner"], sort=False)[list(METRICS)]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    table = mean.copy().astype(object)
    for metric in METRICS:
        table[metric] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[metric], std[metric],
                                                              strict=True)]
    return table.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs")
    parser.add_argument("--category", default="wood")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--partitioners", default=",".join(PARTITIONERS))
    parser.add_argument("--timing-repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = {"category": args.category, "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs, "image-size": args.image_size,
            "dirichlet-alpha": 0.3, "plot-every-round": False}
    # One site per defect type, for every partitioner (label-wise needs exactly that).
    num_sites = len(prepare_data(ExperimentConfig.from_run_config(base), 1).defect_types) - 1
    rows = []
    started = time.perf_counter()
    cells = [(s, p, seed) for seed in range(args.seeds) for p in args.partitioners.split(",")
             for s in args.strategies.split(",")]
    for i, (strategy, partitioner, seed) in enumerate(cells, 1):
        summary = run_cell(base, args.out, strategy, partitioner, seed, num_sites)
        rows.append({"strategy": strategy, "partitioner": partitioner, "seed": seed,
                     "seconds": summary["seconds"],
                     **{m: summary["final"][m] for m in METRICS}})
        print(f"[{i}/{len(cells)} +{time.perf_counter() - started:.0f}s] {strategy} "
              f"{partitioner} seed {seed}: " + " ".join(f"{m}={rows[-1][m]:.3f}" for m in METRICS),
              flush=True)
    # The centralized reference: one site holding all the data, the same rounds x epochs.
    for seed in range(args.seeds):
        summary = run_cell(base, args.out, "fedavg", "iid", seed, 1)
        rows.append({"strategy": "centralized", "partitioner": "all data", "seed": seed,
                     "seconds": summary["seconds"], **{m: summary["final"][m] for m in METRICS}})
    runs = pd.DataFrame(rows)
    runs.to_csv(args.out / "runs.csv", index=False)
    table = summarize(runs)
    table.to_csv(args.out / "table.csv", index=False)
    print(f"\n{args.category}, {num_sites} sites, {args.rounds} rounds x {args.local_epochs} "
          f"local epochs, image size {args.image_size}, seeds 0..{args.seeds - 1}\n")
    print(table.to_markdown(index=False))
    timing = aggregation_times(base, num_sites, args.timing_repeats)
    timing.to_csv(args.out / "aggregation_times.csv", index=False)
    print("\n" + timing.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
