"""Choosing the feature heads' settings without test images: a validation split of synthetic
anomalies on held-out normal training images.

A fifth of each category's normal training images is held out; a feature head (``--method``,
the Sinkhorn memory bank by default) is fitted on the rest; the held-out images are scored as
they are (normal) and with DRAEM / CutPaste-style anomalies (fedad.train.synthetic_anomalies,
which knows nothing of the synthetic data generator). Image and pixel AUROC on that split
compare the values of any HeadSettings keys (``--vary KEY VALUE ...``, repeatable; every
combination is run), at each image size, on large (the papers' sizes) and small anomalies
(``--extents``). Features are extracted once per combination of feature settings, each head is
fitted once and each map computed once. Only training images are read, so the same procedure
serves real data.

    python bench/heads_validation.py --out /tmp/hv --vary feature-layers 2,3 1,2,3 \
        --vary map-baseline false true --extents small large
    python bench/heads_validation.py --out /tmp/hv-flow --method flow --vary flow-blocks 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from fedad.config import ConfigError
from fedad.data import AnomalyDataset, scan_category
from fedad.experiment import dataset_categories
from fedad.heads.registry import HEADS, head_settings_from, settings_extractor
from fedad.heads.scoring import (
    anomaly_maps,
    extract_patches,
    image_scores,
    map_baseline,
    normal_map,
)
from fedad.heads.settings import HeadSettings
from fedad.heads.whitening import Whitening, feature_moments, whiten
from fedad.train.synthetic_anomalies import EXTENTS, AnomalySynthesizer

log = logging.getLogger("bench.heads_validation")
HOLDOUT = 0.2
FEATURE_FIELDS = tuple(f.name for f in dataclasses.fields(HeadSettings)
                       if f.name.startswith("feature_") and f.name != "feature_whitening")
"""Settings that change the patch features (features are extracted once per combination)."""
MAP_FIELDS = ("map_sigma", "map_baseline")
IMAGE_SCORE_FIELDS = ("image_score", "topk_fraction")
"""Settings applied to the maps of a fitted head; every other field changes the fit."""
cached_extractor = functools.cache(settings_extractor)
"""One extractor per (settings, image size), shared by the categories."""


def validation_split(root: Path, category: str, image_size: int, seed: int
                     ) -> tuple[list, torch.Tensor]:
    """(fit samples, held-out normals [M, 3, S, S]) of a category's training images under the
    MVTec-layout ``root``."""
    train = [s for s in scan_category(root, category) if s.split == "train"]
    order = np.random.default_rng(seed).permutation(len(train))
    held = max(1, round(HOLDOUT * len(train)))
    dataset = AnomalyDataset([train[i] for i in order[:held]], image_size)
    normals = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return [train[i] for i in order[held:]], normals


def grouped(points: list[HeadSettings], fields: tuple[str, ...]
            ) -> Iterator[tuple[HeadSettings, list[HeadSettings]]]:
    """(first point, points) for each distinct value of ``fields`` among ``points``, in order."""
    groups: dict[tuple, list[HeadSettings]] = {}
    for point in points:
        groups.setdefault(tuple(getattr(point, f) for f in fields), []).append(point)
    for members in groups.values():
        yield members[0], members


def validate(root: Path, category: str, image_size: int, points: list[HeadSettings],
             seed: int, extents: list[str], copies: int = 1, method: str = "memorybank"
             ) -> Iterator[tuple[HeadSettings, str, dict[str, float]]]:
    """(settings, extent, validation image / pixel AUROC) of the feature head ``method`` on one
    category of ``root`` for each of ``points`` and each extent of synthetic anomalies
    (``copies`` anomalous versions of each held-out normal image)."""
    fit, normals = validation_split(root, category, image_size, seed)
    anomalies = {extent: AnomalySynthesizer(probability=1.0, seed=seed, extent=extent)(
        normals.repeat(copies, 1, 1, 1)) for extent in extents}
    labels = np.r_[np.zeros(len(normals)), np.ones(copies * len(normals))]
    fit_fields = tuple(f.name for f in dataclasses.fields(HeadSettings)
                       if f.name not in MAP_FIELDS + IMAGE_SCORE_FIELDS)
    for extraction, by_features in grouped(points, FEATURE_FIELDS):
        extractor = cached_extractor(extraction, image_size)
        fit_patches = extract_patches(extractor, fit, image_size)
        with torch.no_grad():  # in batches: at feature-scales=3 the backbone's maps are large
            held_out = {extent: torch.cat([extractor(batch) for batch in torch.cat(
                [normals, anomalous]).split(16)]) for extent, (anomalous, _) in anomalies.items()}
        for settings, by_fit in grouped(by_features, fit_fields):
            head = HEADS[method](settings, fit_patches.features.shape[1], seed,
                                 tuple(fit_patches.features.shape[-2:]))
            fit_set = head.fit_rows(fit_patches, seed)
            whitening = (Whitening.from_moments([feature_moments(
                fit_patches.flat(settings.max_patches, seed=seed))])
                if settings.feature_whitening else None)
            payload = head.fit_local(whiten(fit_set, whitening))
            for mapping, by_map in grouped(by_fit, MAP_FIELDS):
                maps_of = functools.partial(anomaly_maps, head, payload, image_size=image_size,
                                            sigma=mapping.sigma(method, image_size),
                                            whitening=whitening)
                baseline = (map_baseline([normal_map(maps_of(fit_patches.features))])
                            if mapping.map_baseline else 0.0)
                for extent, (_, masks) in anomalies.items():
                    maps = maps_of(held_out[extent]) - baseline
                    truth = np.r_[np.zeros(len(normals) * image_size**2),
                                  masks.flatten().numpy()] > 0.5
                    pixel_auroc = roc_auc_score(truth, maps.reshape(-1))
                    for point in by_map:
                        yield point, extent, {
                            "val_image_auroc": roc_auc_score(labels, image_scores(maps, point)),
                            "val_pixel_auroc": pixel_auroc}


def grid(base: list[str], vary: list[list[str]]) -> tuple[list[str], list[HeadSettings]]:
    """(varied run-config keys, settings of every combination of their values over ``base``
    KEY=VALUE items); ConfigError naming a bad key or value."""
    keys = [key for key, *_ in vary]
    points = [head_settings_from([*base, *(f"{k}={v}" for k, v in zip(keys, values, strict=True))])
              for values in itertools.product(*(values for _, *values in vary))]
    return keys, points


def split_arguments(description: str) -> argparse.ArgumentParser:
    """A validation script's parser with its --out, --data-path and --categories."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-path", default="",
                        help="an MVTec AD-layout root; only its training images are read "
                             "(default: the built-in synthetic data)")
    parser.add_argument("--categories", nargs="+",
                        help="default: every category of the data")
    return parser


def main() -> None:
    parser = split_arguments(__doc__.splitlines()[0])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--vary", nargs="+", action="append", default=[],
                        metavar="KEY VALUE",
                        help="a HeadSettings run-config key and the values to compare, e.g. "
                             "--vary feature-layers 2,3 1,2,3 (repeatable: every combination)")
    parser.add_argument("--set", nargs="+", action="extend", default=["max-patches=8000"],
                        metavar="KEY=VALUE", help="the other settings (default: HeadSettings' "
                        "defaults, max-patches=8000)")
    parser.add_argument("--extents", nargs="+", default=["large"], choices=sorted(EXTENTS),
                        help="sizes of the synthetic anomalies (fedad.train.synthetic_anomalies)")
    parser.add_argument("--copies", type=int, default=1,
                        help="anomalous versions of each held-out normal image")
    parser.add_argument("--method", default="memorybank", choices=sorted(HEADS),
                        help="the feature head validated (default: the Sinkhorn memory bank)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(len(values) < 2 for values in args.vary):
        parser.error("--vary KEY VALUE [VALUE ...]: a key and at least one value")
    try:
        keys, points = grid(args.set, args.vary)
    except ConfigError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        root, args.categories = dataset_categories(args.data_path, args.categories)
    except ConfigError as err:
        parser.error(str(err))
    rows = []
    for category, image_size in itertools.product(args.categories, args.image_sizes):
        for point, extent, result in validate(root, category, image_size, points, args.seed,
                                              args.extents, args.copies, args.method):
            rows.append({"category": category, "image_size": image_size, "extent": extent,
                         **{k: getattr(point, k.replace("-", "_")) for k in keys}, **result})
            log.info("%s", rows[-1])
    table = pd.DataFrame(rows)
    means = table.groupby(["image_size", "extent", *keys], as_index=False).mean(
        numeric_only=True)
    table = pd.concat([table, means.assign(category="mean")], ignore_index=True)
    table.to_csv(args.out / "validation.csv", index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
