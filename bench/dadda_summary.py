"""Table II (DAM-only vs D-ADDA) over several `bench/dadda.py` runs: one row per category and
synthesis (mean ± std over the seeds found), a mean over categories, and how often D-ADDA beat
DAM-only on each column.

    for run in "brick 4 0" "brick 4 1" "wood 4 0" "hex_nut 5 0"; do set -- $run
      OMP_NUM_THREADS=1 python bench/dadda.py --out ~/fedad-bench/dadda-$1-s$3 --category $1 \\
        --clients $2 --set seed=$3
    done
    python bench/dadda_summary.py ~/fedad-bench/dadda-*-s*
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

KEYS = ("Synthesis", "category", "seed")


def read_runs(folders: list[Path]) -> pd.DataFrame:
    """One row per (run folder, synthesis): its table_ii.csv row with category and seed from
    the run's config.yaml."""
    rows = []
    for folder in folders:
        for table in sorted(folder.glob("*/table_ii.csv")):
            config = yaml.safe_load((table.parent / "config.yaml").read_text())
            rows.append(pd.read_csv(table).assign(category=config["category"],
                                                  seed=config["seed"]))
    if not rows:
        raise SystemExit(f"no */table_ii.csv under {', '.join(map(str, folders))}")
    return pd.concat(rows, ignore_index=True)


def summarize(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean ± std over seeds per category and synthesis, then the mean of the category means;
    D-ADDA's wins over DAM-only per column, counted over (category, seed) pairs)."""
    metrics = [c for c in runs.columns if c not in KEYS]
    grouped = runs.groupby(["category", "Synthesis"])[metrics]
    means, spread = grouped.mean().round(1).astype(str), grouped.std().round(1).astype(str)
    seeds = grouped.size()
    several = (seeds > 1).to_numpy()[:, None].repeat(len(metrics), axis=1)
    text = means.mask(several, means + " ± " + spread)
    text.insert(0, "seeds", seeds)
    overall = grouped.mean().groupby("Synthesis").mean().round(1).astype(str)
    overall.index = pd.MultiIndex.from_product([["mean of categories"], overall.index],
                                               names=["category", "Synthesis"])
    overall.insert(0, "seeds", "")
    table = pd.concat([text, overall]).reset_index()
    paired = runs.pivot_table(index=["category", "seed"], columns="Synthesis",
                              values=metrics).dropna()  # complete (dam-only, dadda) pairs only
    if paired.empty or {"dadda", "dam-only"} - set(paired.columns.get_level_values(1)):
        raise SystemExit("no run folder holds both dam-only/ and dadda/ results")
    wins = pd.DataFrame({m: [f"{int((paired[m]['dadda'] > paired[m]['dam-only']).sum())} / "
                             f"{len(paired)}"] for m in metrics}, index=["D-ADDA > DAM-only"])
    return table, wins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench/dadda.py --out folders")
    args = parser.parse_args()
    table, wins = summarize(read_runs(args.folders))
    print(table.to_markdown(index=False))
    print()
    print(wins.to_markdown())


if __name__ == "__main__":
    main()
