"""Choosing the feature heads' preprocessing without test images: a validation split of
synthetic anomalies on held-out normal training images.

A fifth of each category's normal training images is held out; the Sinkhorn memory bank
(HeadSettings' defaults) is fitted on the rest; the held-out images are scored as they are
(normal) and with DRAEM / CutPaste-style anomalies (fedad.train.synthetic_anomalies, which knows
nothing of the synthetic data generator). Image and pixel AUROC on that split compare, on
whitened patch features (fedad.heads.whitening; ``--features raw whitened`` adds raw ones),
each image size, set of backbone levels, reflect padding of the image (feature-padding), set
of image scales (feature-scales), per-image normalisation (feature-photometric) and bank size
(num-prototypes), on large (the papers' sizes) and small anomalies (``--extents``).
Only training images are read, so the same procedure serves real data.

    python bench/heads_validation.py --out /tmp/heads-validation
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from fedad.data import SYNTHETIC_CATEGORIES, AnomalyDataset, ensure_synthetic, scan_category
from fedad.heads.features import PHOTOMETRIC
from fedad.heads.memory_bank import MemoryBankHead
from fedad.heads.registry import settings_extractor
from fedad.heads.scoring import (
    anomaly_maps,
    extract_patches,
    image_scores,
    map_baseline,
    normal_map,
)
from fedad.heads.settings import HeadSettings
from fedad.heads.whitening import Whitening, feature_moments
from fedad.train.synthetic_anomalies import EXTENTS, AnomalySynthesizer

log = logging.getLogger("bench.heads_validation")
HOLDOUT = 0.2
cached_extractor = functools.cache(settings_extractor)
"""One extractor per (settings, image size), shared by the categories."""


def validation_split(category: str, image_size: int, seed: int
                     ) -> tuple[list, torch.Tensor]:
    """(fit samples, held-out normals [M, 3, S, S]) of a category's training images."""
    train = [s for s in scan_category(ensure_synthetic(), category) if s.split == "train"]
    order = np.random.default_rng(seed).permutation(len(train))
    held = max(1, round(HOLDOUT * len(train)))
    dataset = AnomalyDataset([train[i] for i in order[:held]], image_size)
    normals = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return [train[i] for i in order[held:]], normals


def validate(category: str, image_size: int, settings: HeadSettings, seed: int,
             extents: list[str], copies: int = 1, map_sigmas: tuple[float, ...] = (),
             prototypes: tuple[int, ...] = (), features: tuple[str, ...] = ("whitened",)
             ) -> list[dict[str, float | str]]:
    """Validation image / pixel AUROC of the Sinkhorn bank on one category, on each of
    ``features`` ("raw", "whitened"), for each extent of synthetic anomalies, each bank size
    (``prototypes``, default settings.num_prototypes), each smoothing of the map
    (``map_sigmas``, default settings.map_sigma), and with or without the map baseline (the
    border artefact of the fit images' maps, fedad.heads.scoring.map_baseline; the features
    are extracted once and each bank is fitted once; ``copies`` anomalous versions of each
    held-out normal image)."""
    fit, normals = validation_split(category, image_size, seed)
    extractor = cached_extractor(settings, image_size)
    fit_patches = extract_patches(extractor, fit, image_size)
    bank = fit_patches.flat(settings.max_patches, seed=seed)
    whitening = Whitening.from_moments([feature_moments(bank)])
    whitenings = {name: w for name, w in (("raw", None), ("whitened", whitening))
                  if name in features}
    heads = {(name, k): MemoryBankHead(replace(settings, num_prototypes=k), bank.shape[1], seed)
             for name, k in itertools.product(whitenings, prototypes or
                                              (settings.num_prototypes,))}
    payloads = {(name, k): head.fit_local(bank if whitenings[name] is None
                                          else whitenings[name].apply(bank))
                for (name, k), head in heads.items()}
    sigmas = map_sigmas or (settings.map_sigma,)
    baselines = {(key, sigma): map_baseline([normal_map(anomaly_maps(
        heads[key], payloads[key], fit_patches.features, image_size, sigma,
        whitening=whitenings[key[0]]))])
        for key, sigma in itertools.product(heads, sigmas)}
    labels = np.r_[np.zeros(len(normals)), np.ones(copies * len(normals))]
    rows = []
    for extent in extents:
        anomalous, masks = AnomalySynthesizer(probability=1.0, seed=seed, extent=extent)(
            normals.repeat(copies, 1, 1, 1))
        with torch.no_grad():  # in batches: at feature-scales=3 the backbone's maps are large
            features = torch.cat([extractor(batch)
                                  for batch in torch.cat([normals, anomalous]).split(16)])
        truth = np.r_[np.zeros(len(normals) * image_size**2), masks.flatten().numpy()] > 0.5
        for key, sigma in itertools.product(heads, sigmas):
            raw_maps = anomaly_maps(heads[key], payloads[key], features, image_size, sigma,
                                    whitening=whitenings[key[0]])
            for subtract in (False, True):
                maps = raw_maps - baselines[key, sigma] if subtract else raw_maps
                rows.append({
                    "extent": extent, "features": key[0], "K": key[1], "map_sigma": sigma,
                    "map_baseline": subtract,
                    "val_image_auroc": roc_auc_score(labels, image_scores(maps, settings)),
                    "val_pixel_auroc": roc_auc_score(truth, maps.reshape(-1))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--categories", nargs="+", default=list(SYNTHETIC_CATEGORIES))
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--feature-layers", nargs="+", default=[HeadSettings().feature_layers],
                        help="backbone levels to compare, e.g. 2,3 1,2")
    parser.add_argument("--feature-paddings", nargs="+", type=int,
                        default=[HeadSettings().feature_padding],
                        help="reflect paddings to compare, pixels, e.g. 0 32")
    parser.add_argument("--feature-scales", nargs="+", default=[HeadSettings().feature_scales],
                        help="image resize factors to compare, e.g. 1 1,2")
    parser.add_argument("--feature-photometrics", nargs="+",
                        default=[HeadSettings().feature_photometric], choices=PHOTOMETRIC,
                        help="per-image normalisations to compare, e.g. none grey-world")
    parser.add_argument("--extents", nargs="+", default=["large"], choices=sorted(EXTENTS),
                        help="sizes of the synthetic anomalies (fedad.train.synthetic_anomalies)")
    parser.add_argument("--map-sigmas", nargs="+", type=float, default=[],
                        help="Gaussian smoothing of the map to compare, pixels (default: "
                             "map-sigma's default)")
    parser.add_argument("--copies", type=int, default=1,
                        help="anomalous versions of each held-out normal image")
    parser.add_argument("--num-prototypes", nargs="+", type=int, default=[],
                        help="memory bank sizes K to compare (default: num-prototypes' default)")
    parser.add_argument("--features", nargs="+", default=["whitened"],
                        choices=["raw", "whitened"], help="patch features the banks are fitted on")
    parser.add_argument("--max-patches", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in args.categories:
        for layers, padding, scales, photometric, image_size in itertools.product(
                args.feature_layers, args.feature_paddings, args.feature_scales,
                args.feature_photometrics, args.image_sizes):
            settings = HeadSettings(max_patches=args.max_patches, feature_layers=layers,
                                    feature_padding=padding, feature_scales=scales,
                                    feature_photometric=photometric)
            for result in validate(category, image_size, settings, args.seed, args.extents,
                                   args.copies, tuple(args.map_sigmas),
                                   tuple(args.num_prototypes), tuple(args.features)):
                rows.append({"category": category, "layers": layers, "padding": padding,
                             "scales": scales, "photometric": photometric,
                             "image_size": image_size, **result})
                log.info("%s", rows[-1])
    table = pd.DataFrame(rows)
    keys = ["layers", "padding", "scales", "photometric", "image_size", "K", "extent", "features",
            "map_sigma", "map_baseline"]
    means = table.groupby(keys, as_index=False).mean(numeric_only=True)
    table = pd.concat([table, means.assign(category="mean")], ignore_index=True)
    table.to_csv(args.out / "validation.csv", index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
