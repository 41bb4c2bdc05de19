"""Per-image inference latency of every registered detector, on one CPU core.

For each method in fedad.methods.METHODS with a model recipe (the registry is read at run time,
so methods added later are measured too), the model is built at each image size and timed
end to end on one test image through the recipe's own ``predict``: image loading and resizing,
the forward pass and the method's post-processing (e.g. map smoothing). torch.set_num_threads(1);
median of ``--repeats`` after ``--warmup`` runs, wall clock and process CPU time (the latter
is less sensitive to other jobs on a shared machine). Methods without a recipe are listed.

    python bench/perf_latency.py --sizes 128,224 --repeats 30
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import pandas as pd
import torch

from fedad.config import ExperimentConfig
from fedad.experiment import prepare_data
from fedad.methods import METHODS
from fedad.task import model_recipe


def latency(method: str, image_size: int, repeats: int, warmup: int) -> dict:
    """Median and p90 seconds of one image through ``method``'s predict at ``image_size``."""
    cfg = ExperimentConfig(method=method, image_size=image_size)
    recipe = model_recipe(cfg)
    data = prepare_data(cfg, 1)
    sample = data.samples(-1, "test")[:1]
    model = recipe.build(cfg).eval()
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            predictions = recipe.predict(model, sample, cfg, data.defect_types)
            if i >= warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    assert predictions.maps.shape[-2:] == (image_size, image_size), predictions.maps.shape
    wall.sort()
    return {"method": method, "image_size": image_size,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "median_ms": 1000 * statistics.median(wall),
            "p90_ms": 1000 * wall[int(0.9 * (len(wall) - 1))],
            "median_cpu_ms": 1000 * statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,224")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    rows, skipped = [], []
    for method, entry in METHODS.items():
        if not entry.recipe:
            skipped.append(method)
            continue
        for size in map(int, args.sizes.split(",")):
            rows.append(latency(method, size, args.repeats, args.warmup))
            print(f"{method} {size}px: {rows[-1]['median_ms']:.1f} ms", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f}, 1 thread, median of "
          f"{args.repeats} after {args.warmup} warm-up runs, default config of each method\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))
    if skipped:
        print(f"\nno single-model recipe (not timed here): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
