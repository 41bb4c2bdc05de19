"""Byzantine-robustness benchmark: one of five sites is malicious (sign-flip or scale attack,
fedad.attacks) and FedAvg, FedMedian, FedTrimmedAvg, Krum and ACA aggregate; the no-attack
FedAvg run is the reference.

Each run is the real server workflow and site code on an in-process grid (fedad.inprocess: no
Ray, same messages). Runs are resumable: a run whose folder has summary.json is read, not rerun.

    python bench/byzantine.py --out ~/fedad-bench/robustness --rounds 3 --local-epochs 10 \
        --seeds 0,1,2                                      # the table in BENCHMARKS.md

Each seed's runs go to OUT/seed-<seed>/ (bench/dp.py uses the same folders, sharing the
no-attack reference); with several seeds the mean ± std table is written to OUT/<table>.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from fedad.config import ExperimentConfig
from fedad.inprocess import run_in_process

ROBUST = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "aca")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
REFERENCE = "fedavg-no-attack"
"""The run without attack or DP (FedAvg), shared by this benchmark and bench/dp.py."""


def run_variant(base: dict, out: Path, name: str, overrides: dict, num_sites: int) -> dict:
    """Final summary of one run of ``base`` + ``overrides`` (read back when already done)."""
    folder = out / name
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    cfg = ExperimentConfig.from_run_config({**base, **overrides, "results-dir": str(folder)})
    return run_in_process(cfg, num_sites)


def run_table(base: dict, out: Path, variants: dict[str, dict], num_sites: int,
              table: str, columns: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per variant: its final METRICS, seconds and :func:`model_distance` (plus
    ``columns[name]`` if given), with progress lines; also written to ``out/<table>.csv``.
    Runs of the same name in ``out`` are shared between tables (the no-attack FedAvg run is
    also the no-DP reference)."""
    rows, started = [], time.perf_counter()
    for i, (name, overrides) in enumerate(variants.items(), 1):
        summary = run_variant(base, out, name, overrides, num_sites)
        rows.append({"run": name, **(columns or {}).get(name, {}),
                     **{m: round(summary["final"][m], 3) for m in METRICS},
                     "seconds": round(summary["seconds"])})
        print(f"[{i}/{len(variants)} +{time.perf_counter() - started:.0f}s] {name}: "
              + " ".join(f"{m}={rows[-1][m]:.3f}" for m in METRICS), flush=True)
    frame = pd.DataFrame(rows)
    frame["model_distance"] = [round(model_distance(out, name), 2) for name in frame["run"]]
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{table}.csv", index=False)
    return frame


def _final_weights(folder: Path, final: bool = True) -> torch.Tensor:
    """The global model's float parameters after the last (or the one before) round, flat."""
    checkpoints = sorted((folder / "checkpoints").glob("round-*.pt"))
    state = torch.load(checkpoints[-1 if final else -2], map_location="cpu",
                       weights_only=False)["state_dict"]
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def model_distance(out: Path, name: str) -> float:
    """||theta_run - theta_ref|| of the final global models, in units of the reference's own
    last-round step ||theta_ref(T) - theta_ref(T-1)|| (0: the run ends where the clean run
    does; about 1: one round's progress away)."""
    reference = _final_weights(out / REFERENCE)
    step = torch.linalg.norm(reference - _final_weights(out / REFERENCE, final=False))
    return float(torch.linalg.norm(_final_weights(out / name) - reference) / step)


def common_settings(args: argparse.Namespace) -> dict:
    """The small configuration both benchmarks share (see --help), without the seed."""
    return {"category": args.category, "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs, "image-size": args.image_size,
            "min-train-nodes": args.sites, "plot-every-round": False}


def run_seeds(base: dict, args: argparse.Namespace, variants: dict[str, dict], table: str,
              columns: dict[str, dict] | None = None) -> pd.DataFrame:
    """:func:`run_table` for every seed of ``--seeds`` (folders OUT/seed-<seed>), then the
    mean ± std over seeds of every numeric column per run (OUT/<table>.csv)."""
    frames = []
    for seed in (int(s) for s in args.seeds.split(",")):
        frame = run_table({**base, "seed": seed}, args.out / f"seed-{seed}", variants,
                          args.sites, table, columns)
        frames.append(frame.assign(seed=seed))
    runs = pd.concat(frames)
    numeric = [c for c in runs.columns if c not in ("run", "seed")]
    grouped = runs.groupby("run", sort=False)[numeric]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    summary = mean.round(3).astype(object)
    for column in (*METRICS, "model_distance"):
        summary[column] = [f"{m:.3f} ± {s:.3f}" if column in METRICS else f"{m:.2f} ± {s:.2f}"
                           for m, s in zip(mean[column], std[column], strict=True)]
    summary["seconds"] = mean["seconds"].round().astype(int)
    summary = summary.reset_index()
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / f"{table}.csv", index=False)
    return summary


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments both benchmarks take."""
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs")
    parser.add_argument("--category", default="wood")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--attack", default="sign-flip", choices=("sign-flip", "scale"))
    parser.add_argument("--attack-scale", type=float, default=10.0)
    parser.add_argument("--malicious", default="0", help="malicious partition ids")
    parser.add_argument("--strategies", default=",".join(ROBUST))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = common_settings(args)
    attack = {"attack": args.attack, "attack-scale": args.attack_scale,
              "malicious-partitions": args.malicious,
              "num-malicious-nodes": len(args.malicious.split(","))}  # Krum's f
    variants = {REFERENCE: {"strategy": "fedavg"}}
    variants |= {f"{s}-{args.attack}": {"strategy": s, **attack}
                 for s in args.strategies.split(",")}
    table = run_seeds(base, args, variants, "byzantine")
    print(f"\n{args.category}, {args.sites} sites (malicious: {args.malicious}, {args.attack} "
          f"x{args.attack_scale:g}), {args.rounds} rounds x {args.local_epochs} local epochs, "
          f"image size {args.image_size}, seeds {args.seeds}\n")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
