"""D-ADDA's downstream networks (eq. 8) as one federated model: a defect-type classifier F_cls
(a timm ResNet from scratch, or the ImageNet Lite0 fine-tuned) and a U-Net localizer
F_det/loc, trained on a site's real data plus the synthetic defect pairs its stage 3 cached on
disk, and averaged by FedAvg.

Model output: ``class_logits`` [B, K] over the category's K defect types ("good" excluded) and
``anomaly_logits`` [B, 1, H, W]. Detection score of an image = the maximum of its smoothed map.

The classifier sees either the whole image (the paper) or, by default, windows of it
(``dadda-classifier-input=windows``): trained on a window at a random pixel of each defect's
mask, labelled with its type, and on windows of normal images, labelled "no defect" (an extra,
K+1-th class); an image's defect type is the type that some window of a grid is most confident
of. Industrial defects often cover under 1 % of the image; a whole-image classifier fitted on a
few real defects per type learns the images, not the defects (measured in BENCHMARKS.md,
section D-ADDA).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from fedad.config import ExperimentConfig
from fedad.dadda.settings import DADDASettings
from fedad.dadda.synthesis import DefectPairs
from fedad.data import AnomalyDataset, Sample, list_categories, scan_category
from fedad.device import autocast, cpu_numpy, model_device, to_device
from fedad.experiment import resolve_categories, resolve_root
from fedad.models.anomaly_map import MapSettings, smooth_maps
from fedad.models.backbones import create_classifier
from fedad.models.localizer import UNetLocalizer
from fedad.task import ModelRecipe
from fedad.train.loop import train_loop
from fedad.train.losses import focal_loss, soft_dice_loss
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)

IGNORE = -100
"""Class target of normal images: the classifier only learns among defect types."""


@dataclass
class DetectorOutput:
    """class_logits [B, K], anomaly_logits [B, 1, H, W]."""

    class_logits: torch.Tensor
    anomaly_logits: torch.Tensor


WINDOW_SIDE = 96
"""Side in pixels at which the classifier sees a window (resampled to it)."""


def mask_centres(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random defect pixel of each mask [B, 1, H, W] -> centres [B, 2] (row, column), float;
    a uniformly random pixel for an empty mask (a normal image)."""
    defect = (masks.flatten(1) > 0.5).float()
    normal = defect.sum(dim=1, keepdim=True) == 0
    weights = torch.where(normal, torch.ones_like(defect), defect)
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    width = masks.shape[-1]
    return torch.stack([index // width, index % width], dim=1).float()


def _window_size(height: int, width: int, fraction: float) -> int:
    """Side in pixels of a window of ``fraction`` of the image's shorter side."""
    return max(1, round(fraction * min(height, width)))


def window_grid(height: int, width: int, fraction: float, stride: float) -> torch.Tensor:
    """Centres [G, 2] (row, column) of windows of ``fraction`` of the image side, ``stride``
    (a fraction of the side) apart, covering the image edge to edge."""
    size = _window_size(height, width, fraction)
    step = max(1.0, stride * min(height, width))
    axes = []
    for side in (height, width):
        first, last = (size - 1) / 2, side - 1 - (size - 1) / 2
        count = max(1, int(np.ceil((last - first) / step)) + 1)
        axes.append(torch.linspace(first, last, count))
    return torch.cartesian_prod(*axes)


def windows_at(images: torch.Tensor, centres: torch.Tensor, fraction: float,
               side: int = WINDOW_SIDE) -> torch.Tensor:
    """Square windows of ``fraction`` of the image side around ``centres`` [B, 2] (row,
    column), shifted to lie inside the image: images [B, 3, H, W] -> [B, 3, side, side]."""
    height, width = images.shape[-2:]
    size = _window_size(height, width, fraction)
    top = (centres[:, 0] - (size - 1) / 2).round().clamp(0, height - size)
    left = (centres[:, 1] - (size - 1) / 2).round().clamp(0, width - size)
    boxes = torch.stack([torch.arange(len(images)).to(top), left, top, left + size, top + size],
                        dim=1).to(images)
    return roi_align(images, boxes, output_size=side, aligned=True)


class DADDADetector(nn.Module):
    """F_cls and F_det/loc (U-Net) on the same image.

    Args:
        num_defect_types: K, the defect types.
        classifier: ``lite0`` (ImageNet pre-trained, fine-tuned) or a timm architecture name
            trained from scratch (e.g. resnet10t, resnet18); see
            :func:`fedad.models.backbones.create_classifier`.
        localizer_channels: base channels of the U-Net localizer.
        window_fraction: None: the classifier sees the whole image (the paper); else windows of
            this fraction of the image side, with K + 1 outputs (the last: no defect).
        window_stride: distance of the scanned windows' centres, a fraction of the image side.
    """

    def __init__(self, num_defect_types: int, classifier: str = "resnet10t",
                 localizer_channels: int = 16, window_fraction: float | None = None,
                 window_stride: float = 0.125) -> None:
        super().__init__()
        if num_defect_types < 1:
            raise ValueError(f"DADDADetector: num_defect_types={num_defect_types} must be >= 1")
        self.num_defect_types = num_defect_types
        self.window_fraction = window_fraction
        self.window_stride = window_stride
        outputs = num_defect_types + (window_fraction is not None)
        self.classifier = create_classifier(classifier, outputs)
        self.localizer = UNetLocalizer(localizer_channels)

    def window_logits(self, images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W], centres [B, 2] -> logits [B, K + 1] of the window at each
        centre (the last class: no defect)."""
        if self.window_fraction is None:
            raise ValueError("window_logits: this detector classifies whole images")
        return self.classifier(windows_at(images, centres, self.window_fraction))

    def class_logits(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """images [B, 3, H, W] -> defect-type scores [B, K]: the whole image's logits, or the
        log of each type's highest probability over the window grid (``chunk`` windows per
        classifier call)."""
        if self.window_fraction is None:
            return self.classifier(images)
        grid = window_grid(*images.shape[-2:], self.window_fraction, self.window_stride
                           ).to(images.device)
        index = torch.arange(len(images), device=images.device).repeat_interleave(len(grid))
        centres = grid.repeat(len(images), 1)
        logits = torch.cat([self.window_logits(images[index[part]], centres[part])
                            for part in torch.arange(len(index), device=images.device
                                                     ).split(chunk)])
        probabilities = logits.softmax(dim=1).view(len(images), len(grid), -1)
        return probabilities[..., :-1].amax(dim=1).clamp_min(1e-12).log()

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        """images [B, 3, H, W] in [0, 1] -> :class:`DetectorOutput` (class scores [B, K])."""
        return DetectorOutput(self.class_logits(images), self.localizer(images))


@functools.lru_cache(maxsize=8)
def defect_types_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The category's defect types, sorted, "good" excluded (the classifier's classes)."""
    root = resolve_root(cfg)
    found = {s.defect_type for c in resolve_categories(cfg, root) for s in scan_category(root, c)}
    types = tuple(sorted(found - {"good"}))
    if not types:
        raise ValueError(f"data-path={str(root)!r} category={cfg.category!r}: no defect types "
                         f"in the test split (available categories: {list_categories(root)})")
    return types


def build_detector(cfg: ExperimentConfig) -> DADDADetector:
    """The detector for ``cfg``'s category (settings ``dadda-classifier``,
    ``dadda-localizer-channels``, ``dadda-classifier-input``, ``dadda-window-fraction``,
    ``dadda-window-stride``)."""
    settings = cfg.section(DADDASettings)
    windows = settings.dadda_classifier_input == "windows"
    return DADDADetector(len(defect_types_of(cfg)), settings.dadda_classifier,
                         settings.dadda_localizer_channels,
                         settings.dadda_window_fraction if windows else None,
                         settings.dadda_window_stride)


CACHE_VERSION = 2
"""Bumped when the synthetic pairs a site caches change meaning."""
SYNTHESIS_KEYS = frozenset({"data-path", "category", "seed", "partitioner", "dirichlet-alpha",
                            "image-size", "use-real-defects", "val-fraction"})
"""Core run-config keys that stages 1-3 depend on (besides the dam-* and dadda-* keys)."""
DETECTOR_KEYS = frozenset({"dadda-classifier", "dadda-classifier-input", "dadda-window-fraction",
                           "dadda-window-stride", "dadda-classifier-lr", "dadda-localizer-channels",
                           "dadda-cache-dir", "dadda-reuse-cache"})
"""dadda-* keys of the detector and of the cache itself, not of the synthesis."""


def synthetic_cache_path(cfg: ExperimentConfig, samples: Sequence[Sample]) -> Path:
    """Where a site keeps its synthetic pairs between messages (each deployment message starts
    a fresh ClientApp process): ``dadda-cache-dir`` (default ``~/.cache/fedad/dadda``) /
    a digest of the settings stages 1-3 depend on (:data:`SYNTHESIS_KEYS`, every ``dam-*`` and
    ``dadda-*`` key but the detector's) and of the site's training images. Runs that differ
    only in the detector or the federated stage (B, E, rounds, strategy, ...) share the pairs."""
    settings = cfg.section(DADDASettings)
    base = Path(settings.dadda_cache_dir or Path.home() / ".cache" / "fedad" / "dadda")
    config = {k: v for k, v in cfg.to_dict().items()
              if k in SYNTHESIS_KEYS or (k.startswith(("dam-", "dadda-"))
                                          and k not in DETECTOR_KEYS)}
    key = json.dumps({"version": CACHE_VERSION, "config": config,
                      "samples": sorted(str(s.image_path) for s in samples)},
                     sort_keys=True, default=str)
    return base.expanduser() / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def _real_tensors(samples: Sequence[Sample], cfg: ExperimentConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """images [N, 3, H, W], masks [N, 1, H, W], labels [N] and classes [N] (IGNORE for normal
    images) of ``samples`` at ``image-size``."""
    dataset = AnomalyDataset(samples, cfg.image_size, defect_types=("good", *defect_types_of(cfg)))
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        size = cfg.image_size
        return (torch.zeros(0, 3, size, size), torch.zeros(0, 1, size, size),
                torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"] for item in items])
    labels = torch.stack([torch.as_tensor(item["label"]) for item in items]).long()
    classes = torch.stack([torch.as_tensor(item["defect_class"]) for item in items]).long() - 1
    return images, masks, labels, torch.where(labels > 0, classes, IGNORE)


def _pair_tensors(pairs: DefectPairs, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic pairs resized to ``size``: images, masks, labels (all 1) and classes."""
    images = torch.from_numpy(pairs.images).permute(0, 3, 1, 2).float()
    masks = torch.from_numpy(pairs.masks).float()[:, None]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear",
                               align_corners=False).clamp(0, 1)
        masks = F.interpolate(masks, size=(size, size), mode="nearest")
    classes = torch.from_numpy(pairs.classes).long()
    return images, masks, torch.ones(len(pairs), dtype=torch.long), classes


def detector_loss(output: DetectorOutput, masks: torch.Tensor, classes: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Cross-entropy over defect types (defective images only) + focal and Dice loss of the
    map. masks [B, 1, H, W], classes [B] (IGNORE for normal images)."""
    map_loss = focal_loss(output.anomaly_logits, masks) * 5 + soft_dice_loss(
        output.anomaly_logits, masks)
    has_class = classes != IGNORE
    class_loss = (F.cross_entropy(output.class_logits[has_class], classes[has_class])
                  if has_class.any() else output.class_logits.sum() * 0.0)
    return {"loss": map_loss + class_loss, "map_loss": map_loss, "class_loss": class_loss}


def _training_output(model: DADDADetector, images: torch.Tensor, masks: torch.Tensor,
                     classes: torch.Tensor, generator: torch.Generator
                     ) -> tuple[DetectorOutput, torch.Tensor]:
    """The detector's output on a training batch and the class targets [B]: a whole-image
    classifier's, or a windows classifier's on one window per image (at a defect pixel, or
    anywhere in a normal image, whose target becomes the no-defect class K). The window
    centres are drawn on the CPU with ``generator`` (the same draws on every device)."""
    if model.window_fraction is None:
        return model(images), classes
    centres = mask_centres(masks.cpu(), generator).to(images.device)
    logits = model.window_logits(images, centres)
    targets = torch.where(classes == IGNORE, model.num_defect_types, classes)
    return DetectorOutput(logits, model.localizer(images)), targets


def fit_detector(model: DADDADetector, samples: Sequence[Sample], cfg: ExperimentConfig, *,
                 seed: int, server_round: int, extra_loss=None) -> dict[str, float]:
    """One site's local training for a round: ``local-epochs`` over its real training samples
    plus its cached synthetic pairs (:func:`synthetic_cache_path`), batches of
    ``batch-size``, AdamW at ``lr`` (localizer) and ``dadda-classifier-lr`` (classifier);
    ``max-train-batches`` caps each epoch. A windows classifier sees the window at a random
    pixel of each defect's mask, and at a random pixel of each normal image ("no defect").

    The tensors stay on the CPU; each batch moves to the model's device.

    Returns mean losses of the last epoch, ``num-examples``, ``num-synthetic``, ``train_seconds``.
    """
    start = time.perf_counter()
    synthetic = DefectPairs.load(synthetic_cache_path(cfg, samples))
    parts = [_real_tensors(samples, cfg), _pair_tensors(synthetic, cfg.image_size)]
    images, masks, labels, classes = (torch.cat(t) for t in zip(*parts, strict=True))
    if not len(images):
        raise ValueError("fit_detector: the site has no training images")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        [{"params": model.localizer.parameters()},
         {"params": model.classifier.parameters(),
          "lr": cfg.section(DADDASettings).dadda_classifier_lr}],
        lr=cfg.lr, weight_decay=1e-4)
    device = model_device(model)
    model.train()

    def batches() -> Iterator[torch.Tensor]:
        """One epoch's shuffled index batches [B] (BatchNorm needs two images: no batch of 1)."""
        for batch in torch.randperm(len(images), generator=generator).split(cfg.batch_size):
            if len(batch) >= 2:
                yield batch

    def step(batch: torch.Tensor):
        part = to_device((images[batch], masks[batch], labels[batch], classes[batch]), device)
        output, targets = _training_output(model, part[0], part[1], part[3], generator)
        return output, part[2], detector_loss(output, part[1], targets)

    result = train_loop(step, (batches() for _ in range(cfg.local_epochs)), optimizer,
                        list(model.parameters()), max_batches=cfg.max_train_batches,
                        extra_loss=extra_loss, precision=cfg.precision,
                        name=f"fit_detector (round {server_round})")
    result.update({"num-examples": len(images), "num-synthetic": len(synthetic),
                   "train_seconds": time.perf_counter() - start})
    return result


@torch.no_grad()
def _batched(model: nn.Module, function, *tensors: torch.Tensor, precision: str = "32",
             batch_size: int = 32) -> np.ndarray:
    """``function`` of ``tensors`` (CPU, rows aligned) without gradients, ``batch_size`` rows
    at a time moved to ``model``'s device under ``precision``'s autocast, concatenated as
    numpy."""
    device = model_device(model)
    outputs = []
    for part in torch.arange(len(tensors[0])).split(batch_size):
        with autocast(device, precision):
            outputs.append(cpu_numpy(function(*to_device([t[part] for t in tensors], device))))
    return np.concatenate(outputs)


def predict_detector(model: DADDADetector, samples: Sequence[Sample], cfg: ExperimentConfig,
                     defect_types: Sequence[str] | None = None) -> Predictions:
    """Maps (sigmoid, Gaussian-smoothed, ``map-sigma``: by default 2 px at 128 px) and image
    scores (map maximum) of ``samples``; 0.5 is the decision threshold."""
    dataset = AnomalyDataset(samples, cfg.image_size, defect_types=defect_types)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items])
    model.eval()
    maps = _batched(model, lambda x: torch.sigmoid(model.localizer(x).float())[:, 0], images,
                    precision=cfg.precision)
    sigma = cfg.section(MapSettings).sigma("dadda", cfg.image_size)
    maps = smooth_maps(maps, sigma).astype(np.float32)
    return Predictions(
        labels=np.array([int(item["label"]) for item in items]),
        defect_classes=np.array([int(item["defect_class"]) for item in items]),
        image_scores=maps.reshape(len(maps), -1).max(axis=1),
        masks=torch.stack([item["mask"][0] for item in items]).numpy(),
        maps=maps, images=images.permute(0, 2, 3, 1).numpy(),
    ).check()


@dataclass
class Defects:
    """Defective images [N, 3, H, W] in [0, 1], their masks [N, 1, H, W] and defect-type
    indices [N] in [0, K)."""

    images: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor


def load_defects(samples: Sequence[Sample], cfg: ExperimentConfig) -> Defects:
    """The defective ``samples`` at ``image-size``, read once for any number of models."""
    images, masks, _, classes = _real_tensors([s for s in samples if s.label == 1], cfg)
    return Defects(images, masks, classes)


def classify(model: DADDADetector, defects: Defects, at_true_defect: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) defect-type indices [N] in [0, K) of ``defects``.

    ``at_true_defect``: a windows classifier looks only at the window at a pixel of the
    ground-truth mask (seeded) instead of scanning the image: its accuracy given where the
    defect is, a diagnostic that separates recognising a defect type from finding the
    defect."""
    if not len(defects.images):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    model.eval()
    if at_true_defect:
        centres = mask_centres(defects.masks, torch.Generator().manual_seed(0))
        logits = _batched(model,
                          lambda x, c: model.window_logits(x, c)[:, :model.num_defect_types],
                          defects.images, centres)
    else:
        logits = _batched(model, model.class_logits, defects.images)
    return defects.classes.numpy(), logits.argmax(axis=1)


DADDA_RECIPE = ModelRecipe(build=build_detector, fit=fit_detector, predict=predict_detector)

__all__ = ["DADDA_RECIPE", "DADDADetector", "Defects", "DetectorOutput", "classify",
           "defect_types_of", "load_defects",
           "mask_centres", "synthetic_cache_path", "window_grid", "windows_at"]
