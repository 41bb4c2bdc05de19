"""Feature heads benchmark: memory bank (Sinkhorn K-means, k-means, coreset kNN), GMM and flow
on pretrained Lite0 patch features; centralized vs federated (one-shot and one refinement
round); cross-domain (sources -> target category); the K ablation; latency and memory.

Features are extracted once per category and reused by every head; the heads, merges,
refinements, scoring and calibration are the library functions the Flower workflow runs
(fedad.heads), called directly. Calibration uses the sites' normal training images; only
the metrics read the test split. Nothing is tuned here: settings are HeadSettings' defaults
unless ``--set`` changes them. Writes heads.csv, defect_types.csv, image_scores.csv (every test
image's score: which normal images outrank which defects), k_ablation.csv, cross_domain.csv
and latency.csv under ``--out``.

    python bench/heads.py --out /tmp/heads-bench            # all synthetic categories
    python bench/heads.py --out /tmp/heads-bench --latency  # + per-image latency at 128/224
    python bench/heads.py --out /tmp/heads-bench --set max-patches=8000 map-sigma=4
    python bench/heads.py --out /tmp/heads-mvtec --data-path ~/mvtec_ad --categories screw
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedad.config import ConfigError, ExperimentConfig
from fedad.experiment import dataset_categories, prepare_data
from fedad.heads.payload import Payload
from fedad.heads.registry import HEADS, head_settings_from, settings_extractor
from fedad.heads.scoring import (
    PatchSet,
    ScoreScale,
    anomaly_maps,
    extract_patches,
    image_scores,
    map_baseline,
    normal_map,
    score_moments,
)
from fedad.heads.settings import HeadSettings
from fedad.heads.whitening import Whitening, feature_moments, whiten
from fedad.heads.workflow import evaluate_head
from fedad.metrics import defect_type_table
from fedad.train.predictions import Predictions

log = logging.getLogger("bench.heads")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
HEAD_NAMES = ["bank-sinkhorn", "bank-kmeans", "coreset-10%", "gmm", "flow"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A head under test: method name and its settings."""

    name: str
    method: str
    settings: HeadSettings
    federated: bool = True


def variants(num_train_patches: int, base: HeadSettings) -> list[Variant]:
    """The heads compared, on ``base`` (the run's max-patches and feature padding, defaults
    otherwise; the coreset keeps 10 % of the patches,
    PatchCore's middle setting, as a centralized baseline only: its bank is patch features)."""
    coreset_size = max(1, min(num_train_patches, base.max_patches) // 10)
    return [
        Variant("bank-sinkhorn", "memorybank", base),
        Variant("bank-kmeans", "memorybank", dataclasses.replace(base, bank_clustering="kmeans")),
        Variant("coreset-10%", "memorybank",
                dataclasses.replace(base, bank_clustering="coreset", num_prototypes=coreset_size),
                federated=False),
        Variant("gmm", "gmm", base),
        Variant("flow", "flow", base),
    ]


def selected_variants(num_train_patches: int, args: argparse.Namespace) -> list[Variant]:
    """The :func:`variants` on ``args.settings`` that ``args.heads`` names."""
    return [v for v in variants(num_train_patches, args.settings) if v.name in args.heads]


def evaluate(variant: Variant, payload: Payload, sites: list[PatchSet], test: PatchSet,
             image_size: int, seed: int, whitening: Whitening | None
             ) -> tuple[dict[str, float], Predictions]:
    """Test metrics and predictions of ``payload`` on features whitened by ``whitening`` (if
    any), with the map baseline (map-baseline) and the calibration from the sites' normal
    training images."""
    head = HEADS[variant.method](variant.settings, test.features.shape[1], seed)
    sigma = variant.settings.sigma(variant.method, image_size)
    site_maps = [anomaly_maps(head, payload, site.features, image_size, sigma,
                              whitening=whitening) for site in sites]
    baseline = site_baseline(variant.settings, site_maps)
    moments = [score_moments(maps, variant.settings, baseline) for maps in site_maps]
    cfg = ExperimentConfig(method=variant.method, image_size=image_size, seed=seed,
                           extra={k.replace("_", "-"): v for k, v in
                                  dataclasses.asdict(variant.settings).items()})
    metrics, predictions = evaluate_head(head, payload, test, ScoreScale.from_moments(moments),
                                         cfg, baseline, whitening)
    return {k: metrics[k] for k in METRICS}, predictions


def site_baseline(settings: HeadSettings, site_maps: list[np.ndarray]) -> np.ndarray | None:
    """The map baseline [S, S] from each site's normal maps [N, S, S], as the server pools it
    (None without ``settings.map_baseline``)."""
    if not settings.map_baseline:
        return None
    return map_baseline([normal_map(maps) for maps in site_maps])


def fit(variant: Variant, sites: list[PatchSet], seed: int, rounds: int,
        whitening: Whitening | None) -> Payload:
    """One-shot federated head (``rounds`` = 1) or with refinement rounds, on features whitened
    by ``whitening`` (if any); one site = the centralized reference."""
    head = HEADS[variant.method](variant.settings, sites[0].features.shape[1], seed)
    limit = variant.settings.max_patches
    features = [whiten(s.flat(limit, seed=seed + i), whitening) for i, s in enumerate(sites)]
    payloads = [head.fit_local(f) for f in features]
    global_head = payloads[0] if len(sites) == 1 else head.merge(payloads)
    for _ in range(rounds - 1):
        global_head = head.refine(global_head, [head.refine_local(global_head, f)
                                                for f in features])
    return global_head


def category_patches(category: str, image_size: int, num_sites: int, seed: int, extractor,
                     data_path: str = ""
                     ) -> tuple[list[PatchSet], PatchSet, tuple[str, ...], list[str]]:
    """Normal training patches of each IID site, the test patches of one category, its defect
    types (the names of the test patches' defect classes) and the test images' names
    (``defect_type/file``, in the order of the test patches). ``data_path``: an MVTec-layout
    root (empty: the built-in synthetic data)."""
    cfg = ExperimentConfig(category=category, image_size=image_size, seed=seed,
                           min_train_nodes=1, data_path=data_path)
    data = prepare_data(cfg, num_sites)
    sites = [extract_patches(extractor, [s for s in data.samples(i, "train") if s.label == 0],
                             image_size) for i in range(num_sites)]
    test_samples = data.samples(-1, "test")
    test = extract_patches(extractor, test_samples, image_size, data.defect_types)
    names = [f"{s.image_path.parent.name}/{s.image_path.name}" for s in test_samples]
    return sites, test, data.defect_types, names


def site_whitening(sites: list[PatchSet], settings: HeadSettings, seed: int
                   ) -> Whitening | None:
    """The federated whitening (fedad.heads.whitening) pooled from the sites' feature moments
    of ``settings.max_patches`` patches each; None without ``settings.feature_whitening``."""
    if not settings.feature_whitening:
        return None
    return Whitening.from_moments([feature_moments(s.flat(settings.max_patches, seed=seed + i))
                                   for i, s in enumerate(sites)])


def pooled(sites: list[PatchSet]) -> PatchSet:
    """The sites' patches as one site (the centralized reference)."""
    return PatchSet(torch.cat([s.features for s in sites]),
                    *(np.concatenate([getattr(s, k) for s in sites])
                      for k in ("labels", "defect_classes", "masks", "images")))


def run_categories(args: argparse.Namespace, extractor) -> tuple[dict[str, pd.DataFrame], dict]:
    """Tables by file name: ``heads`` (centralized / federated rows per category and head),
    ``defect_types`` (the same per defect type: image AUROC against the good images, share
    flagged), ``image_scores`` (every test image's score, to see which images rank wrongly) and
    ``k_ablation`` (unless skipped); and each category's patches for the cross-domain runs (only
    when they will run)."""
    rows, type_rows, image_rows, ablation_rows, patches = [], [], [], [], {}
    keep_patches = len(args.categories) > 1 and not args.skip_cross_domain
    for category in args.categories:
        started = time.perf_counter()
        sites, test, types, names = category_patches(category, args.image_size, args.sites,
                                                     args.seed, extractor, args.data_path)
        if keep_patches:
            patches[category] = (*sites, test)
        whitening = site_whitening(sites, args.settings, args.seed)
        log.info("%s: features of %d + %d images in %.1f s", category,
                 sum(len(s.labels) for s in sites), len(test.labels),
                 time.perf_counter() - started)
        central = [pooled(sites)]
        for variant in selected_variants(central[0].num_patches, args):
            settings = [("centralized", central, 1)]
            if variant.federated:
                settings += [(f"federated {args.sites} sites, 1 round", sites, 1),
                             (f"federated {args.sites} sites, 3 rounds", sites, 3)]
            for label, data, rounds in settings:
                t0 = time.perf_counter()
                payload = fit(variant, data, args.seed, rounds, whitening)
                metrics, predictions = evaluate(variant, payload, sites, test, args.image_size,
                                                args.seed, whitening)
                key = {"category": category, "head": variant.name, "setting": label}
                rows.append({**key, **metrics, "fit_s": round(time.perf_counter() - t0, 1)})
                log.info("%s", rows[-1])
                type_rows += [{**key, **r} for r in defect_type_table(
                    predictions.labels, predictions.defect_classes, predictions.image_scores,
                    types, ranking_scores=predictions.ranked())]
                image_rows += [{**key, "image": name, "label": int(label), "score": score}
                               for name, label, score in zip(names, predictions.labels,
                                                             predictions.ranked(), strict=True)]
        if not args.skip_ablation:
            ablation_rows += k_ablation(args, category, sites, test, whitening)
    tables = {"heads": rows, "defect_types": type_rows, "image_scores": image_rows,
              "k_ablation": ablation_rows}
    return {name: pd.DataFrame(table) for name, table in tables.items()}, patches


def run_cross_domain(args: argparse.Namespace, patches: dict) -> pd.DataFrame:
    """By-category federation (one site per category): the global bank merged from the source
    categories' banks only, and from all categories' banks, scored on each target category's
    test split (calibrated on the contributing sites' normal images, whitened by their
    moments)."""
    variant = variants(1, args.settings)[0]
    sites = {c: pooled(list(p[:-1])) for c, p in patches.items()}
    rows = []
    for target in patches:
        sources = [c for c in patches if c != target]
        for label, members in (("sources only", sources),
                               ("sources + target site", [*sources, target])):
            member_sites = [sites[c] for c in members]
            whitening = site_whitening(member_sites, args.settings, args.seed)
            payload = fit(variant, member_sites, args.seed, 1, whitening)
            rows.append({"category": target, "head": variant.name, "setting": label,
                         **evaluate(variant, payload, member_sites, patches[target][-1],
                                    args.image_size, args.seed, whitening)[0]})
            log.info("%s", rows[-1])
    return pd.DataFrame(rows)


def k_ablation(args: argparse.Namespace, category: str, sites: list[PatchSet], test: PatchSet,
               whitening: Whitening | None) -> list[dict]:
    """NexViTAD Fig. 8 on one category's patches (whitened by ``whitening``, if any): each K of
    ``--ablation-ks``, Sinkhorn bank, centralized and federated."""
    rows = []
    for k in args.ablation_ks:
        variant = Variant(f"bank-sinkhorn K={k}", "memorybank",
                          dataclasses.replace(args.settings, num_prototypes=k))
        for label, data in (("centralized", [pooled(sites)]),
                            (f"federated {args.sites} sites", sites)):
            payload = fit(variant, data, args.seed, 1, whitening)
            rows.append({"category": category, "K": k, "setting": label,
                         **evaluate(variant, payload, sites, test, args.image_size,
                                    args.seed, whitening)[0]})
            log.info("%s", rows[-1])
    return rows


def run_latency(args: argparse.Namespace) -> pd.DataFrame:
    """Per-image latency (one thread, median of 10 single images after 2 warm-ups) of feature
    extraction + head scoring + map post-processing, the head's size, and peak RSS, for each of
    ``--heads``."""
    rows = []
    category = args.categories[0]
    for image_size in (128, 224):
        extractor = settings_extractor(args.settings, image_size)
        sites, test, *_ = category_patches(category, image_size, 1, args.seed, extractor,
                                           args.data_path)
        whitening = site_whitening(sites, args.settings, args.seed)
        for variant in selected_variants(sites[0].num_patches, args):
            payload = fit(variant, sites, args.seed, 1, whitening)
            head = HEADS[variant.method](variant.settings, extractor.dim, args.seed)
            sigma = variant.settings.sigma(variant.method, image_size)
            baseline = site_baseline(variant.settings, [anomaly_maps(
                head, payload, sites[0].features, image_size, sigma, whitening=whitening)])
            images = [torch.from_numpy(test.images[i]).permute(2, 0, 1)[None]
                      for i in range(12)]
            times = []
            for image in images:
                t0 = time.perf_counter()
                maps = anomaly_maps(head, payload, extractor(image), image_size, sigma,
                                    baseline, whitening)
                image_scores(maps, variant.settings)
                times.append(time.perf_counter() - t0)
            rows.append({"image_size": image_size, "head": variant.name,
                         "latency_ms": round(1000 * float(np.median(times[2:])), 1),
                         "head_kib": round(sum(a.nbytes for a in payload.arrays.values())
                                           / 1024, 1),
                         "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF)
                                               .ru_maxrss / 1024)})
            log.info("%s", rows[-1])
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-path", default="",
                        help="an MVTec AD-layout root, e.g. a real MVTec AD download (default: "
                             "the built-in synthetic data)")
    parser.add_argument("--categories", nargs="+",
                        help="default: every synthetic category, or every category under "
                             "--data-path")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", nargs="+", default=HEAD_NAMES)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--skip-categories", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--ablation-ks", nargs="+", type=int, default=[5, 10, 20, 30, 40],
                        help="bank sizes K of the ablation (NexViTAD Fig. 8: 5 10 20 30 40)")
    parser.add_argument("--skip-cross-domain", action="store_true")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="HeadSettings run-config keys, e.g. max-patches=8000 "
                             "feature-whitening=false map-sigma=2 (default: their defaults)")
    args = parser.parse_args()
    try:
        args.settings = head_settings_from(args.set)
    except ConfigError as err:
        parser.error(f"--set {err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        _, args.categories = dataset_categories(args.data_path, args.categories)
    except ConfigError as err:
        parser.error(str(err))
    if args.latency:
        run_latency(args).to_csv(args.out / "latency.csv", index=False)
        print(pd.read_csv(args.out / "latency.csv").to_markdown(index=False))
    if args.skip_categories:
        return
    extractor = settings_extractor(args.settings, args.image_size)
    tables, patches = run_categories(args, extractor)
    for name, table in tables.items():
        if len(table):
            table.to_csv(args.out / f"{name}.csv", index=False)
    per_type = tables["defect_types"]
    if patches:
        run_cross_domain(args, patches).to_csv(args.out / "cross_domain.csv", index=False)
    for name in ("latency", "heads", "cross_domain", "k_ablation"):
        path = args.out / f"{name}.csv"
        if path.exists():
            print(f"\n## {name}\n" + pd.read_csv(path).to_markdown(index=False, floatfmt=".3f"))
    bank = per_type.query("head == 'bank-sinkhorn' and setting.str.endswith('1 round')",
                          engine="python") if len(per_type) else per_type
    if len(bank):
        print("\n## image AUROC per defect type (bank-sinkhorn, federated, 1 round)\n"
              + bank.pivot(index="category", columns="defect_type", values="image_auroc")
              .drop(columns="good").to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
