"""Choosing what the MAE's anomaly map measures without test images: the validation split of
bench/heads_validation.py (a fifth of a category's normal training images held out, scored as
they are and with DRAEM / CutPaste-style synthetic anomalies) for a MAE trained on the rest.

One MAE per category and image size is trained centrally with the run's local training
(fedad.mae.training.fit_mae, ``--rounds`` x ``local-epochs``, the pre-training / fine-tuning
schedule of a federated run); every combination of ``--passes`` (inference masking, 0: the
seed's unmasked pass) and ``--errors`` (pixel or feature-space error) then scores the same
held-out images, so the comparison costs one training. Only training images are read.

    python bench/mae_validation.py --out /tmp/maev --data-path ~/fedad-real \
        --set mae-norm=dyt --passes 0 4 --errors pixel feature
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from heads_validation import split_arguments, validation_split
from sklearn.metrics import roc_auc_score

from fedad.config import ExperimentConfig
from fedad.experiment import dataset_categories
from fedad.mae.scoring import ERRORS, anomaly_error, error_extractor, inference_masks
from fedad.mae.training import build_mae, fit_mae, map_sigma
from fedad.models.anomaly_map import smooth_maps
from fedad.train.synthetic_anomalies import EXTENTS, AnomalySynthesizer

log = logging.getLogger("bench.mae_validation")


def train_mae(cfg: ExperimentConfig, samples: list, rounds: int, seed: int) -> torch.nn.Module:
    """A MAE of ``cfg`` trained on ``samples`` for ``rounds`` rounds of local training."""
    model = build_mae(cfg)
    for server_round in range(1, rounds + 1):
        metrics = fit_mae(model, samples, cfg, seed=seed + server_round,
                          server_round=server_round)
        log.info("round %d: train_loss %.4f (%.0f s)", server_round, metrics["train_loss"],
                 metrics["train_seconds"])
    return model.eval()


@torch.no_grad()
def error_maps(model: torch.nn.Module, images: torch.Tensor, passes: int, error: str,
               sigma: float) -> np.ndarray:
    """images [M, 3, S, S] -> smoothed maps [M, S, S] of ``error`` with ``passes``."""
    extractor, masks = error_extractor(error), inference_masks(model.grid, passes)
    maps = torch.cat([anomaly_error(model, batch, masks, extractor)
                      for batch in images.split(16)])
    return smooth_maps(maps.numpy(), sigma)


def validate(cfg: ExperimentConfig, root: Path, rounds: int, passes: list[int],
             errors: list[str], extents: list[str], seed: int) -> list[dict]:
    """Validation image / pixel AUROC of each (passes, error, extent) on ``cfg.category``."""
    fit, normals = validation_split(root, cfg.category, cfg.image_size, seed)
    started = time.perf_counter()
    model = train_mae(cfg, fit, rounds, seed)
    trained = time.perf_counter() - started
    rows = []
    for extent in extents:
        anomalous, masks = AnomalySynthesizer(probability=1.0, seed=seed, extent=extent)(normals)
        images = torch.cat([normals, anomalous])
        labels = np.r_[np.zeros(len(normals)), np.ones(len(anomalous))]
        truth = np.r_[np.zeros(normals[:, 0].numel()), masks.flatten().numpy()] > 0.5
        for count, error in itertools.product(passes, errors):
            maps = error_maps(model, images, count, error, map_sigma(cfg))
            rows.append({"category": cfg.category, "image_size": cfg.image_size,
                         "extent": extent, "passes": count, "error": error,
                         "val_image_auroc": roc_auc_score(labels, maps.reshape(len(maps), -1)
                                                          .max(1)),
                         "val_pixel_auroc": roc_auc_score(truth, maps.reshape(-1)),
                         "train_seconds": trained})
            log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = split_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of local training (the federated default: 4)")
    parser.add_argument("--passes", nargs="+", type=int, default=[0, 4])
    parser.add_argument("--errors", nargs="+", default=list(ERRORS), choices=ERRORS)
    parser.add_argument("--extents", nargs="+", default=["large", "small"],
                        choices=sorted(EXTENTS))
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="run-config values of the MAE (default: pyproject's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    root, categories = dataset_categories(args.data_path, args.categories)
    rows = []
    for category in categories:
        cfg = ExperimentConfig.from_run_config({
            "method": "mae", "data-path": str(root), "category": category,
            **dict(item.split("=", 1) for item in args.set)})
        rows += validate(cfg, root, args.rounds, args.passes, args.errors, args.extents,
                         args.seed)
        pd.DataFrame(rows).to_csv(args.out / "validation.csv", index=False)
    table = pd.DataFrame(rows)
    means = table.groupby(["extent", "passes", "error"], as_index=False).mean(numeric_only=True)
    table = pd.concat([table, means.assign(category="mean")], ignore_index=True)
    table.to_csv(args.out / "validation.csv", index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
