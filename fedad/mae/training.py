"""Local training, calibration and inference of the masked autoencoder (method ``mae``).

Two phases, mapped onto server rounds: rounds 1..``mae-pretrain-rounds`` pre-train with
MSE + ``mae-ssim-weight`` * (1 - SSIM); later rounds fine-tune with the MSE only. Sites train on
their normal images only. After local training each site sets the model's decision thresholds
(the seed's dynamic threshold) from normal images it held out of training, so FedAvg averages
the thresholds with the weights.

Anomaly map: the error between each image and its reconstruction (:mod:`fedad.mae.scoring`:
by default the feature-space error of a reconstruction from complementary masked passes; the
seed's squared pixel error of the unmasked image with ``mae-error=pixel``,
``mae-inference-passes=0``), Gaussian-smoothed
(:data:`fedad.models.anomaly_map.METHOD_MAP_SIGMA`); image score: the map's maximum. Both are
mapped to [0, 1] by ``e / (e + t)``, which is 0.5 exactly at the calibrated threshold t
(fedad's Predictions contract) and keeps the order of the raw errors (AUROC and AUPRO are
unchanged).
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.device import autocast, cpu_numpy, model_device, to_device
from fedad.mae.model import MAEOutput
from fedad.mae.scoring import anomaly_error, error_extractor, inference_masks
from fedad.mae.settings import MAESettings
from fedad.models import create_model
from fedad.models.anomaly_map import MapSettings, smooth_maps
from fedad.task import ExtraLoss, ModelRecipe
from fedad.train.loop import make_loader, train_loop
from fedad.train.predictions import Predictions
from fedad.train.ssim import ssim

log = logging.getLogger(__name__)


def build_mae(cfg: ExperimentConfig) -> nn.Module:
    """The MAE of ``cfg``'s ``mae-*`` settings at ``cfg.image_size`` (no pretrained weights)."""
    s = cfg.section(MAESettings)
    if cfg.image_size % s.mae_patch_size:
        raise ValueError(f"image-size={cfg.image_size} is not a multiple of "
                         f"mae-patch-size={s.mae_patch_size}")
    return create_model(
        "mae", image_size=cfg.image_size, patch_size=s.mae_patch_size,
        embed_dim=s.mae_embed_dim, depth=s.mae_depth, num_heads=s.mae_heads,
        decoder_dim=s.mae_decoder_dim, decoder_depth=s.mae_decoder_depth,
        decoder_heads=s.mae_decoder_heads, norm=s.mae_norm, mask_ratio=s.mae_mask_ratio,
    )


def map_sigma(cfg: ExperimentConfig) -> float:
    """The MAE's map sigma in pixels (``map-sigma``)."""
    return cfg.section(MapSettings).sigma("mae", cfg.image_size)


def reconstruction_loss(output: MAEOutput, images: torch.Tensor, ssim_weight: float
                        ) -> dict[str, torch.Tensor]:
    """MSE over the whole image, plus ``ssim_weight`` * (1 - SSIM) when the weight is > 0.

    Args:
        output: model output with reconstruction [B, 3, H, W]; images: [B, 3, H, W] targets.
    Returns:
        scalar losses; ``loss`` is the total.
    """
    mse = nn.functional.mse_loss(output.reconstruction, images)
    losses = {"loss": mse, "mse": mse}
    if ssim_weight > 0:
        losses["ssim"] = ssim(output.reconstruction, images).mean()
        losses["loss"] = mse + ssim_weight * (1 - losses["ssim"])
    return losses


def split_holdout(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """A site's normal images split into (train, threshold hold-out).

    The hold-out is chosen by a hash of each image's path, so it is the same in every round
    and never trained on; with fewer than 2 normal images there is no hold-out.
    """
    normal = [s for s in samples if s.label == 0]
    if len(normal) < 2:
        return normal, []
    ranked = sorted(normal, key=lambda s: zlib.crc32(str(s.image_path).encode()))
    count = max(1, round(fraction * len(normal)))
    return ranked[count:], ranked[:count]


def fit_mae(model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig, *, seed: int,
            server_round: int, extra_loss: ExtraLoss | None = None) -> dict[str, float]:
    """One site's local MAE training for a round, then threshold calibration.

    Args:
        samples: the site's training samples (defects among them are not trained on).
        server_round: selects the phase (pre-training while <= ``mae-pretrain-rounds``).
        extra_loss: FedProx / CFA terms, called with (output, labels = zeros [B]).
    Returns:
        last-epoch mean losses (``train_*``), ``num-examples``, ``train_seconds``, the
        calibrated thresholds and ``pretraining`` (1.0 or 0.0).
    """
    s = cfg.section(MAESettings)
    train, holdout = split_holdout(samples, s.mae_holdout_fraction)
    if not train:
        raise ValueError("mae: the site has no normal training images")
    pretraining = server_round <= s.mae_pretrain_rounds
    ssim_weight = s.mae_ssim_weight if pretraining else 0.0
    start = time.perf_counter()
    loader = make_loader(train, cfg.image_size, cfg.batch_size, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    device = model_device(model)
    model.train()

    def step(batch: dict[str, torch.Tensor]):
        images = to_device(batch["image"], device)
        output = model(images, generator=generator)
        labels = torch.zeros(len(images), device=device)
        return output, labels, reconstruction_loss(output, images, ssim_weight)

    result = train_loop(step, itertools.repeat(loader, cfg.local_epochs), optimizer, params,
                        max_batches=cfg.max_train_batches, extra_loss=extra_loss,
                        precision=cfg.precision, name="mae")
    if not holdout:
        log.warning("mae: fewer than 2 normal images; thresholds calibrated on training images")
    calibrate_thresholds(model, holdout or train, cfg)
    result.update({
        "num-examples": len(train), "train_seconds": time.perf_counter() - start,
        "pixel_threshold": float(model.pixel_threshold), "pretraining": float(pretraining),
        "image_threshold": float(model.image_threshold),
    })
    return result


@torch.no_grad()
def reconstruction_errors(model: nn.Module, samples: Sequence[Sample], image_size: int,
                          sigma: float, defect_types: Sequence[str] | None = None,
                          batch_size: int = 16, precision: str = "32", passes: int = 0,
                          error: str = "pixel"
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Raw anomaly maps (smoothed with ``sigma`` pixels) and image scores, computed on the
    model's device under ``precision``'s autocast: ``error`` between the images and their
    reconstructions from ``passes`` complementary masked passes (:mod:`fedad.mae.scoring`).

    Returns:
        maps [N, H, W] (smoothed error), scores [N] (map maxima), and the batches' ``labels``,
        ``defect_classes``, ``masks`` [N, H, W], ``images`` [N, H, W, 3].
    """
    if not samples:
        raise ValueError("mae: no samples to reconstruct")
    model.eval()
    device = model_device(model)
    extractor, masks = error_extractor(error), inference_masks(model.grid, passes)
    loader = make_loader(samples, image_size, batch_size, shuffle=False,
                         defect_types=defect_types)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("maps", "labels", "defect_classes", "masks", "images")}
    for batch in loader:
        images = batch["image"]
        on_device = to_device(images, device)
        with autocast(device, precision):
            errors = cpu_numpy(anomaly_error(model, on_device, masks, extractor).float())
        parts["maps"].append(smooth_maps(errors, sigma))  # [B, H, W]
        parts["labels"].append(batch["label"].numpy())
        parts["defect_classes"].append(batch["defect_class"].numpy())
        parts["masks"].append(batch["mask"][:, 0].numpy())
        parts["images"].append(images.permute(0, 2, 3, 1).numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    maps = out.pop("maps")
    if not np.isfinite(maps).all():
        raise FloatingPointError("mae: non-finite reconstruction errors")
    return maps, maps.reshape(len(maps), -1).max(1), out


def calibrate_thresholds(model: nn.Module, normal: Sequence[Sample], cfg: ExperimentConfig
                         ) -> None:
    """Set ``model.pixel_threshold`` / ``image_threshold`` to the ``mae-threshold-quantile`` of
    the raw pixel errors / image scores of ``normal`` images (which the model was not trained
    on)."""
    s = cfg.section(MAESettings)
    quantile = s.mae_threshold_quantile
    maps, scores, _ = reconstruction_errors(model, normal, cfg.image_size, map_sigma(cfg),
                                            precision=cfg.precision,
                                            passes=s.mae_inference_passes, error=s.mae_error)
    model.pixel_threshold.fill_(max(float(np.quantile(maps, quantile)), 1e-12))
    model.image_threshold.fill_(max(float(np.quantile(scores, quantile)), 1e-12))


def to_unit_interval(errors: np.ndarray, threshold: float) -> np.ndarray:
    """``e / (e + t)``: errors >= 0 -> [0, 1), 0.5 exactly at the threshold ``t`` > 0."""
    if not threshold > 0:
        raise ValueError(f"mae: threshold {threshold} must be > 0 (calibrate the model first)")
    return errors / (errors + threshold)


def predict_mae(model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig,
                defect_types: Sequence[str] | None = None) -> Predictions:
    """Predictions of the calibrated MAE on ``samples`` (maps and scores in [0, 1], 0.5 at the
    model's thresholds)."""
    s = cfg.section(MAESettings)
    maps, scores, rest = reconstruction_errors(model, samples, cfg.image_size, map_sigma(cfg),
                                               defect_types, batch_size=max(cfg.batch_size, 16),
                                               precision=cfg.precision,
                                               passes=s.mae_inference_passes, error=s.mae_error)
    return Predictions(
        maps=to_unit_interval(maps, float(model.pixel_threshold)),
        image_scores=to_unit_interval(scores, float(model.image_threshold)), **rest,
    ).check()


def threshold_f1(predictions: Predictions) -> dict[str, float]:
    """F1 of images and of pixels at the calibrated threshold (score >= 0.5 is anomalous)."""

    def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
        tp = float(np.sum(truth & predicted))
        denominator = float(np.sum(truth)) + float(np.sum(predicted))
        return 2 * tp / denominator if denominator else 0.0

    return {
        "image_f1": f1(predictions.labels > 0, predictions.image_scores >= 0.5),
        "pixel_f1": f1(predictions.masks > 0.5, predictions.maps >= 0.5),
    }


MAE_RECIPE = ModelRecipe(build=build_mae, fit=fit_mae, predict=predict_mae)
