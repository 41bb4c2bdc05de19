"""MAE-DyT benchmark: detection per synthetic category (DyT vs LayerNorm, centralized vs
federated), FLOPs and single-core CPU latency.

Every cell runs the real server workflow and site logic on the in-process grid
(:func:`fedad.inprocess.run_in_process`); "centralized" is one site holding all training
images, "federated" is ``--sites`` IID sites with FedAvg, both with the same rounds, local
epochs and phase schedule. The final global model is reloaded from its checkpoint to report
F1 at the calibrated threshold beside the threshold-free metrics.

Usage: python bench/mae.py [--out DIR] [--categories a,b] [--rounds 6] [--epochs 4]
Prints Markdown tables and writes them to OUT/tables.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedad.config import ExperimentConfig
from fedad.data import SYNTHETIC_CATEGORIES
from fedad.experiment import prepare_data
from fedad.inprocess import run_in_process
from fedad.metrics import anomaly_metrics
from fedad.models import create_model, load_trainable_state_dict
from fedad.results import ResultsWriter
from fedad.train.reconstruction import MAE_RECIPE, threshold_f1

MODEL = {"mae-patch-size": 8, "mae-embed-dim": 96, "mae-depth": 4, "mae-heads": 3,
         "mae-decoder-dim": 64, "mae-decoder-depth": 2, "mae-decoder-heads": 2}
SEED_CONFIG = {"image_size": 256, "patch_size": 16, "embed_dim": 192, "depth": 16,
               "num_heads": 3, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}
COLUMNS = ["image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1", "seconds"]


def run_cell(out: Path, category: str, norm: str, sites: int, args: argparse.Namespace) -> dict:
    """One training run; final-round test metrics plus F1 at the calibrated threshold."""
    name = f"{category}-{norm}-{'central' if sites == 1 else f'fed{sites}'}"
    cfg = ExperimentConfig(
        method="mae", strategy="fedavg", category=category, image_size=args.image_size,
        num_server_rounds=args.rounds, local_epochs=args.epochs, batch_size=16, lr=1e-3,
        backbone="none", min_train_nodes=sites, val_fraction=0.0, plot_every_round=False,
        results_dir=str(out / name), seed=0,
        extra={**MODEL, "mae-norm": norm, "mae-pretrain-rounds": args.pretrain_rounds},
    )
    start = time.perf_counter()
    run_in_process(cfg, sites)
    seconds = time.perf_counter() - start
    _, state, _ = ResultsWriter(out / name, resume=True).load_latest()
    model = MAE_RECIPE.build(cfg)
    load_trainable_state_dict(model, state)
    data = prepare_data(cfg, sites)
    predictions = MAE_RECIPE.predict(model, data.samples(-1, "test"), cfg, data.defect_types)
    metrics = anomaly_metrics(predictions.labels, predictions.image_scores, predictions.masks,
                              predictions.maps)
    row = {"category": category, "norm": norm,
           "setting": "centralized" if sites == 1 else f"FedAvg, {sites} sites",
           **metrics, **threshold_f1(predictions), "seconds": seconds}
    print(f"{name}: " + ", ".join(f"{k}={row[k]:.3f}" for k in COLUMNS), flush=True)
    return row


def cost(norm: str, config: dict, repeats: int) -> dict:
    """Forward FLOPs (torch's counter: matmuls and convolutions) and the median eval latency
    of one image on one CPU thread."""
    torch.manual_seed(0)
    model = create_model("mae", norm=norm, **config).eval()
    image = torch.rand(1, 3, config["image_size"], config["image_size"])
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(image)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for _ in range(3):
            model(image)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(image)
            times.append(time.perf_counter() - start)
        torch.set_num_threads(threads)
    return {"norm": norm, "image_size": config["image_size"],
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "GFLOPs": counter.get_total_flops() / 1e9,
            "cpu_ms_1_thread": 1000 * statistics.median(times)}


def main() -> None:
    """Run the cells and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="fedad-mae-"))
    parser.add_argument("--categories", default=",".join(sorted(SYNTHETIC_CATEGORIES)))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pretrain-rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    bench_config = {"image_size": args.image_size, "patch_size": MODEL["mae-patch-size"],
                    "embed_dim": MODEL["mae-embed-dim"], "depth": MODEL["mae-depth"],
                    "num_heads": MODEL["mae-heads"], "decoder_dim": MODEL["mae-decoder-dim"],
                    "decoder_depth": MODEL["mae-decoder-depth"],
                    "decoder_heads": MODEL["mae-decoder-heads"]}
    costs = [cost(norm, config, args.latency_repeats)
             for config in (bench_config, SEED_CONFIG) for norm in ("dyt", "layernorm")]
    rows = []
    for category in args.categories.split(","):
        for norm, sites in (("dyt", 1), ("layernorm", 1), ("dyt", args.sites)):
            rows.append(run_cell(out, category, norm, sites, args))
    table = pd.DataFrame(rows)
    means = table.groupby(["norm", "setting"], sort=False)[COLUMNS].mean().reset_index()
    means.insert(0, "category", "mean")
    header = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, image-size "
              f"{args.image_size}, {args.rounds} rounds ({args.pretrain_rounds} pre-training) x "
              f"{args.epochs} local epochs, model {MODEL}")
    text = "\n\n".join([
        header,
        pd.concat([table, means])[["category", "norm", "setting", *COLUMNS]].to_markdown(
            index=False, floatfmt=".3f"),
        pd.DataFrame(costs).to_markdown(index=False, floatfmt=".3f"),
    ])
    (out / "tables.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
