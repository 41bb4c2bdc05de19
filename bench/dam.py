"""DAM (D-ADDA stage 1) cost and behaviour per sample at 128x128, like the paper's Table VI.

Usage: python bench/dam.py [--categories brick,wood,gear,hex_nut] [--count 10] [--out DIR]

For each category of the built-in synthetic data, a site holding all train/good images and
the MVTec protocol's training third of each defect type runs DAM with the defaults of
DAMSettings, ``--count`` samples per defect type (sources and eq. (4) references: that type's
training defects). Prints a Markdown table (seconds per sample, per step, eq. (4) pass rate,
tries, mask size) and writes it, per-sample rows (CSV) and one example PNG per category to OUT.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedad.dam import DefectAugmenter, category_kind, plot_dam_samples
from fedad.dam.augment import STEPS
from fedad.data import ensure_synthetic, load_image, load_mask, protocol_split, scan_category
from fedad.data.mvtec import GOOD

SIZE = 128


def run_category(root: Path, category: str, count: int, out: Path) -> list[dict]:
    """Per-sample rows of one category (every defect type); writes an example PNG."""
    train = protocol_split(scan_category(root, category), seed=0).train
    normal = np.stack([load_image(s.image_path, SIZE) for s in train if s.defect_type == GOOD])
    kind = category_kind(category)
    rows = []
    for index, defect_type in enumerate(sorted({s.defect_type for s in train} - {GOOD})):
        group = [s for s in train if s.defect_type == defect_type]
        images = np.stack([load_image(s.image_path, SIZE) for s in group])
        masks = np.stack([load_mask(s.mask_path, SIZE) for s in group]).astype(np.uint8)
        augmenter = DefectAugmenter(normal, images, masks, kind=kind)
        samples = list(augmenter.generate(count, seed=0))
        for sample in samples:
            rows.append({
                "category": category, "kind": kind, "defect": defect_type,
                "seconds": sum(sample.seconds.values()), **sample.seconds,
                "tries": sample.tries, "passed": sample.passed,
                "mask_px": int(sample.mask.sum()),
                "source_px": int(masks[sample.defect_index].sum()),
                "segments": augmenter.superpixels[sample.normal_index].count,
            })
        if index == 0:
            plot_dam_samples(samples[:4], normal, images, masks, out / f"{category}.png",
                             title=f"{category} ({kind}), {defect_type}")
        print(f"{category}/{defect_type}: {count} samples, "
              f"median {np.median([r['seconds'] for r in rows[-count:]]):.2f} s", flush=True)
    return rows


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per category: seconds per sample (median, mean, p90), the mean seconds of each
    step per sample (quick shift: per normal image, on the samples that computed it), eq. (4)
    pass rate and medians of tries, mask sizes and superpixel counts."""
    grouped = frame.groupby(["category", "kind"], sort=False)
    computed = frame[frame["superpixels"] > 0].groupby(["category", "kind"], sort=False)
    table = pd.DataFrame({
        "samples": grouped.size(),
        "s_median": grouped["seconds"].median(),
        "s_mean": grouped["seconds"].mean(),
        "s_p90": grouped["seconds"].quantile(0.9),
        "quickshift_per_image": computed["superpixels"].median(),
        **{f"{step}_mean": grouped[step].mean() for step in STEPS[1:]},
        "passed_pct": 100 * grouped["passed"].mean(),
        "tries_median": grouped["tries"].median(),
        "mask_px": grouped["mask_px"].median(),
        "source_px": grouped["source_px"].median(),
        "segments": grouped["segments"].median(),
    })
    return table.reset_index()


def main() -> None:
    """Run the categories and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", default="brick,wood,gear,hex_nut")
    parser.add_argument("--count", type=int, default=10, help="samples per defect type")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="fedad-dam-"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = ensure_synthetic(seed=0)
    categories = args.categories.split(",")
    rows = [row for c in categories for row in run_category(root, c, args.count, out)]
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "samples.csv", index=False)
    table = summarize(frame)
    header = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {SIZE}x{SIZE}, "
              f"{args.count} samples per defect type, seconds per sample")
    text = header + "\n\n" + table.to_markdown(index=False, floatfmt=".3g")
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
