"""Peak memory and time of one feature-head site against the number of its normal images.

Each measurement is a fresh Python process that does what a site does for ``--method`` with
the run-config ``--set`` gives (HeadSettings' defaults otherwise): extract the patch features
of its N normal training images (kept for the rounds, as the site keeps them), fit its head
on them, and score them (the normal maps of the baseline and calibration messages). Images are
the training images of ``--category`` under ``--data-path`` (repeated in order when there are
fewer than N: memory depends on the count, not on which images). Reported: peak resident
memory of the process (ru_maxrss), the same after imports and the extractor alone (the fixed
part), and seconds of each step; then the least-squares slope in MB per 100 images, which is
what the site's memory grows by, and the largest deviation from that line (linearity).

    python bench/perf_site_memory.py --data-path ~/fedad-real --category kolektorsdd \
        --counts 100 200 300
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd


def measure(data_path: str, category: str, count: int, method: str, items: list[str]) -> dict:
    """One site's peak memory (MB) and step seconds for ``count`` normal images (in this
    process: call it in a fresh one)."""
    from fedad.config import ExperimentConfig
    from fedad.data import scan_category
    from fedad.heads.registry import extractor_for, head_for, head_settings
    from fedad.heads.scoring import anomaly_maps, extract_patches

    cfg = ExperimentConfig.from_run_config({"data-path": data_path, "category": category,
                                            "method": method, "image-size": 224,
                                            **dict(item.split("=", 1) for item in items)})
    train = [s for s in scan_category(data_path, category) if s.split == "train"]
    samples = [train[i % len(train)] for i in range(count)]
    extractor, head = extractor_for(cfg), head_for(cfg)
    fixed_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {}
    start = time.perf_counter()
    patches = extract_patches(extractor, samples, cfg.image_size)
    times["extract_s"] = time.perf_counter() - start
    start = time.perf_counter()
    payload = head.fit_local(head.fit_rows(patches, seed=cfg.seed))
    times["fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    maps = anomaly_maps(head, payload, patches.features, cfg.image_size,
                        head_settings(cfg).sigma(method, cfg.image_size))
    times["maps_s"] = time.perf_counter() - start
    assert maps.shape == (count, cfg.image_size, cfg.image_size)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": count, "peak_mb": peak_mb, "fixed_mb": fixed_mb, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--counts", nargs="+", type=int, default=[100, 200, 300])
    parser.add_argument("--method", default="memorybank")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config values (default: HeadSettings' defaults)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a measuring child
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.data_path, args.category, args.one, args.method,
                                 args.set)))
        return
    rows = []
    for count in args.counts:
        child = subprocess.run(
            [sys.executable, __file__, "--data-path", args.data_path, "--category",
             args.category, "--method", args.method, "--one", str(count), "--set", *args.set],
            capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    slope, intercept = np.polyfit(table["images"], table["peak_mb"], 1)
    deviation = (table["peak_mb"] - (slope * table["images"] + intercept)).abs().max()
    print(table.to_markdown(index=False, floatfmt=".1f"))
    print(f"\nmemory per 100 images: {100 * slope:.0f} MB (fixed part {intercept:.0f} MB; "
          f"largest deviation from the line {deviation:.0f} MB)")


if __name__ == "__main__":
    main()
