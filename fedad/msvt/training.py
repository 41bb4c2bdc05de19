"""Local training and inference of MSVT, a supervised anomaly-segmentation model (method
``msvt``).

A model maps images [B, 3, H, W] in [0, 1] to an output with ``anomaly_logits`` [B, 1, H, W],
``image_logit`` [B] and ``embedding`` [B, D]. Training sees normal images, synthetic anomalies
made on the fly from them, and the real defects that the MVTec protocol lets a site train on.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.device import autocast, cpu_numpy, model_device, to_device
from fedad.models import create_model
from fedad.models.anomaly_map import MapSettings, smooth_maps
from fedad.msvt.model import MSVTOutput
from fedad.task import ModelRecipe
from fedad.train.loop import make_loader, train_loop
from fedad.train.losses import focal_loss, soft_dice_loss
from fedad.train.predictions import Predictions
from fedad.train.synthetic_anomalies import AnomalySynthesizer

log = logging.getLogger(__name__)


def segmentation_loss(
    output: MSVTOutput, masks: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Pixel focal + Dice loss on the map and BCE on the image logit.

    Args:
        output: model output with anomaly_logits [B,1,H,W] and image_logit [B].
        masks: [B, 1, H, W] {0,1}; labels: [B] {0,1}.
    Returns:
        dict of scalar losses with key ``loss`` the total.
    """
    map_loss = focal_loss(output.anomaly_logits, masks) * 5 + soft_dice_loss(
        output.anomaly_logits, masks
    )
    image_loss = nn.functional.binary_cross_entropy_with_logits(output.image_logit, labels.float())
    return {"loss": map_loss + image_loss, "map_loss": map_loss, "image_loss": image_loss}


def train_local(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_batches: int = 0,
    extra_loss: Callable[[MSVTOutput, torch.Tensor], torch.Tensor] | None = None,
    precision: str = "32",
) -> dict[str, float]:
    """Train ``model`` in place on one site's samples, on the model's device (batches are
    decoded and corrupted on the CPU, then moved).

    Args:
        samples: the site's training samples (normal, and real defects with masks).
        max_batches: stop each epoch after this many batches (0: no limit), for tiny CI runs.
        extra_loss: optional callable (output, labels [B]) -> scalar tensor added to the loss
            (FedProx's proximal term; contrastive alignment plugs in here).
        precision: autocast of the forward passes (:func:`fedad.device.autocast`).
    Returns:
        mean losses of the last epoch, ``num-examples`` and ``train_seconds``.
    """
    if not samples:
        raise ValueError("train_local: the site has no training samples")
    start = time.perf_counter()
    loader = make_loader(samples, image_size, batch_size, shuffle=True, seed=seed)
    synthesizer = AnomalySynthesizer(probability=0.5, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    device = model_device(model)
    model.train()

    def step(batch: dict[str, torch.Tensor]):
        images, masks, labels = to_device(_with_synthetic_anomalies(batch, synthesizer), device)
        output = model(images)
        return output, labels, segmentation_loss(output, masks, labels)

    result = train_loop(step, itertools.repeat(loader, epochs), optimizer, params,
                        max_batches=max_batches, extra_loss=extra_loss, precision=precision,
                        name="train_local")
    result["num-examples"] = len(samples)
    result["train_seconds"] = time.perf_counter() - start
    return result


def _with_synthetic_anomalies(
    batch: dict[str, torch.Tensor], synthesizer: AnomalySynthesizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt some normal images of the batch; real defects keep their own masks."""
    images, masks, labels = batch["image"], batch["mask"], batch["label"]
    normal = labels == 0
    if normal.any():
        synth_images, synth_masks = synthesizer(images[normal])
        images = images.clone()
        masks = masks.clone()
        images[normal] = synth_images
        masks[normal] = synth_masks
    labels = (masks.flatten(1).amax(1) > 0).long()
    return images, masks, labels


@torch.no_grad()
def predict(model: nn.Module, samples: Sequence[Sample], image_size: int, sigma: float,
            defect_types: Sequence[str] | None = None, batch_size: int = 32,
            precision: str = "32") -> Predictions:
    """Anomaly maps and image scores of ``model`` on ``samples``, computed on the model's
    device under ``precision``'s autocast; numpy predictions.

    Maps are sigmoid probabilities smoothed by a Gaussian of ``sigma`` pixels; the image score
    is the mean of the image head's probability and the map's maximum.
    """
    model.eval()
    device = model_device(model)
    loader = make_loader(samples, image_size, batch_size, shuffle=False, defect_types=defect_types)
    parts: defaultdict[str, list[np.ndarray]] = defaultdict(list)
    for batch in loader:
        with autocast(device, precision):
            output = model(to_device(batch["image"], device))
        maps = cpu_numpy(torch.sigmoid(output.anomaly_logits.float())[:, 0])
        maps = smooth_maps(maps, sigma)
        head = cpu_numpy(torch.sigmoid(output.image_logit.float()))
        parts["labels"].append(batch["label"].numpy())
        parts["defect_classes"].append(batch["defect_class"].numpy())
        parts["image_scores"].append(0.5 * (head + maps.reshape(len(maps), -1).max(1)))
        parts["masks"].append(batch["mask"][:, 0].numpy())
        parts["maps"].append(maps)
        parts["images"].append(batch["image"].permute(0, 2, 3, 1).numpy())
    return Predictions(**{k: np.concatenate(v) for k, v in parts.items()}).check()


def build_msvt(cfg: ExperimentConfig) -> nn.Module:
    """MSVT at ``cfg.image_size`` on ``cfg.backbone`` (pretrained weights where it has them)."""
    return create_model("msvt", image_size=cfg.image_size, backbone=cfg.backbone,
                        backbone_checkpoint=cfg.backbone_checkpoint or None)


def fit_msvt(model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig, *, seed: int,
             server_round: int, extra_loss=None) -> dict[str, float]:
    """One site's local MSVT training for a round (see :func:`train_local`)."""
    return train_local(model, samples, image_size=cfg.image_size, epochs=cfg.local_epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                       max_batches=cfg.max_train_batches, extra_loss=extra_loss,
                       precision=cfg.precision)


def predict_msvt(model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig,
                 defect_types: Sequence[str] | None = None) -> Predictions:
    """:func:`predict` with the config's image size and map sigma, and an evaluation batch
    size."""
    sigma = cfg.section(MapSettings).sigma("msvt", cfg.image_size)
    return predict(model, samples, cfg.image_size, sigma, defect_types=defect_types,
                   batch_size=max(cfg.batch_size, 16), precision=cfg.precision)


MSVT_RECIPE = ModelRecipe(build=build_msvt, fit=fit_msvt, predict=predict_msvt)

