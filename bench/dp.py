"""Differential-privacy benchmark: the utility cost of central DP (Flower's wrappers via
fedad.privacy) at several noise multipliers, with the (epsilon, delta) each amounts to, next to
the run without DP. Same small configuration, runs folder and in-process grid as
bench/byzantine.py.

    python bench/dp.py --out ~/fedad-bench/robustness --rounds 3 --local-epochs 10 \
        --noise 0,0.1,0.3,1 --seeds 0,1,2                  # the table in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging

from byzantine import REFERENCE, add_common_arguments, common_settings, run_seeds

from fedad.privacy import privacy_epsilon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--dp", default="server-fixed",
                        choices=("server-fixed", "server-adaptive", "client-fixed",
                                 "client-adaptive"))
    parser.add_argument("--noise", default="1.0", help="noise multipliers, comma-separated")
    parser.add_argument("--clipping-norm", type=float, default=1.0,
                        help="the fixed norm, or the initial one of adaptive clipping")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = common_settings(args)
    variants = {REFERENCE: {"strategy": "fedavg"}}  # no DP (also bench/byzantine.py's reference)
    columns = {REFERENCE: {"noise": 0.0, "epsilon": float("inf")}}
    for z in (float(v) for v in args.noise.split(",")):
        name = f"{args.dp}-c{args.clipping_norm:g}-z{z:g}"
        variants[name] = {"dp": args.dp, "dp-noise-multiplier": z, "dp-delta": args.delta,
                          "dp-clipping-norm": args.clipping_norm}
        columns[name] = {"noise": z,
                         "epsilon": round(privacy_epsilon(z, args.rounds, args.delta), 1)}
    table = run_seeds(base, args, variants, f"dp-c{args.clipping_norm:g}", columns)
    print(f"\n{args.category}, {args.sites} sites, {args.rounds} rounds x {args.local_epochs} "
          f"local epochs, image size {args.image_size}, seeds {args.seeds}, dp={args.dp} "
          f"(clipping norm {args.clipping_norm:g}), epsilon at delta={args.delta:g}\n")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
