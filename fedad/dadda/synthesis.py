"""D-ADDA stage 3 on a site: DAM pairs, fine-tuning of G^I with the gated mask cross-attention,
masks sampled from G^M per defect class and images from the fine-tuned G^I (eq. 7).

Everything here runs on the site's own data; nothing is sent anywhere. Arrays are numpy:
images float32 [N, S, S, 3] in [0, 1], masks uint8 [N, S, S] in {0, 1}, classes int64 [N]
in [0, K) (K = the category's defect types, "good" excluded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedad.dadda.diffusion import sample, train_diffusion
from fedad.dadda.settings import DADDASettings
from fedad.dam import DAMSettings, augment_defects
from fedad.device import CPU
from fedad.models.diffusion_unet import DiffusionUNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefectPairs:
    """Defective image/mask pairs with their defect class (see the module docstring)."""

    images: np.ndarray
    masks: np.ndarray
    classes: np.ndarray

    def check(self, name: str = "DefectPairs") -> DefectPairs:
        """ValueError naming ``name`` unless shapes, ranges and dtypes agree; returns self."""
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"{name}.images: expected [N, S, S, 3], got {self.images.shape}")
        if self.masks.shape != self.images.shape[:3] or self.classes.shape != (n,):
            raise ValueError(f"{name}: masks {self.masks.shape} / classes {self.classes.shape} "
                             f"do not match images {self.images.shape}")
        if n and (not np.isfinite(self.images).all() or self.images.min() < 0
                  or self.images.max() > 1):
            raise ValueError(f"{name}.images: expected finite values in [0, 1]")
        if n and not np.isin(self.masks, (0, 1)).all():
            raise ValueError(f"{name}.masks: expected values in {{0, 1}}")
        return self

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def empty(cls, size: int) -> DefectPairs:
        """No pairs, at side ``size``."""
        return cls(np.zeros((0, size, size, 3), np.float32), np.zeros((0, size, size), np.uint8),
                   np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[DefectPairs]) -> DefectPairs:
        """All pairs of ``parts`` (at least one) in order."""
        return cls(np.concatenate([p.images for p in parts]),
                   np.concatenate([p.masks for p in parts]),
                   np.concatenate([p.classes for p in parts])).check()

    def save(self, path: Path) -> None:
        """Write an .npz atomically (a temporary file, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=self.images, masks=self.masks, classes=self.classes)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> DefectPairs:
        """Read what :meth:`save` wrote (FileNotFoundError naming the path if absent)."""
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no synthetic pairs cached")
        with np.load(path) as data:
            return cls(data["images"], data["masks"], data["classes"]).check(str(path))


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """[N, S, S, C] in [0, 1] -> [N, C, S, S] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def dam_pairs(normal_images: np.ndarray, real: DefectPairs, *, count: int, kind: str, seed: int,
              dam_settings: DAMSettings) -> DefectPairs:
    """Stage 1's DAM (part A's :func:`fedad.dam.augment_defects`): ``count`` new pairs per
    defect class present in ``real``, made from that class's real defects and the site's
    normal images [N, S, S, 3]."""
    real.check("real defects")
    parts = [DefectPairs.empty(normal_images.shape[1])]
    for offset, defect_class in enumerate(np.unique(real.classes)):
        chosen = real.classes == defect_class
        images, masks = augment_defects(
            normal_images, real.images[chosen], real.masks[chosen], count=count, kind=kind,
            seed=seed + 7919 * offset, settings=dam_settings)
        parts.append(DefectPairs(images, masks, np.full(count, defect_class, np.int64)))
    return DefectPairs.concat(parts)


def finetune_image_model(pretrained: Mapping[str, torch.Tensor], pairs: DefectPairs, *,
                         settings: DADDASettings, seed: int,
                         device: torch.device = CPU,
                         precision: str = "32") -> DiffusionUNet:
    """G^I with mask cross-attention, started from the server's unconditional G^I weights
    (``pretrained``: its state dict) and fine-tuned on the site's defective ``pairs`` on
    ``device`` under ``precision``'s autocast.

    Only the cross-attention, mask-embedding and mask-time modules are new; every pretrained
    weight must load (ValueError otherwise). Returns the EMA model (on ``device``).
    """
    pairs.check("fine-tuning pairs")
    if not len(pairs):
        raise ValueError("finetune_image_model: the site has no defective pairs to fine-tune on")
    model = DiffusionUNet(**settings.unet_kwargs(3, mask_conditioning=True))
    try:
        result = model.load_state_dict(dict(pretrained), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"G^I weights do not fit the conditional U-Net: {err}") from err
    new = ("mask_vector.", "mask_time.", "embed_defect.", "embed_normal.", "kv_defect.",
           "kv_normal.")
    unexpected = list(result.unexpected_keys)
    not_new = [k for k in result.missing_keys if not any(part in k for part in new)]
    if unexpected or not_new:
        raise ValueError(f"G^I weights do not fit the conditional U-Net: unexpected "
                         f"{unexpected[:5]}, missing {not_new[:5]}")
    masks = torch.from_numpy(pairs.masks).float()[:, None]
    ema, stats = train_diffusion(model.to(device), to_model_range(pairs.images),
                                 settings=settings, iterations=settings.dadda_finetune_iterations,
                                 seed=seed, masks=masks, name="G^I fine-tuning",
                                 precision=precision)
    log.info("G^I fine-tuned on %d pairs: loss %.4f in %.1f s", len(pairs), stats["loss"],
             stats["seconds"])
    return ema


def sample_masks(mask_model: DiffusionUNet, classes: Sequence[int], count: int, *,
                 settings: DADDASettings, seed: int, max_rounds: int = 3,
                 precision: str = "32") -> DefectPairs:
    """``count`` non-empty masks per class from G^M (classifier-free guidance, on its device
    under ``precision``'s autocast), thresholded at 0 in the model range; empty masks are
    redrawn up to ``max_rounds`` times, then left out. Returns pairs whose images are zeros
    (only masks and classes are filled)."""
    size = mask_model.image_size
    kept: list[tuple[np.ndarray, int]] = []
    for defect_class in classes:
        found: list[np.ndarray] = []
        for attempt in range(max_rounds):
            need = count - len(found)
            if need <= 0:
                break
            drawn = sample(mask_model, need, settings=settings,
                           seed=seed + 104729 * defect_class + attempt,
                           classes=torch.full((need,), int(defect_class), dtype=torch.long),
                           precision=precision)
            binary = (drawn[:, 0] > 0).numpy().astype(np.uint8)
            found += [m for m in binary if m.any()]
        if len(found) < count:
            log.warning("G^M: class %d gave %d non-empty masks of %d", defect_class, len(found),
                        count)
        kept += [(m, int(defect_class)) for m in found[:count]]
    if not kept:
        return DefectPairs.empty(size)
    masks = np.stack([m for m, _ in kept])
    return DefectPairs(np.zeros((*masks.shape, 3), np.float32), masks,
                       np.array([c for _, c in kept], np.int64)).check("sampled masks")


def diffusion_pairs(image_model: DiffusionUNet, mask_model: DiffusionUNet,
                    classes: Sequence[int], count: int, *, settings: DADDASettings,
                    seed: int, precision: str = "32") -> DefectPairs:
    """Eq. (7): M_i = G^M(z | class), I_i = G^I(z | M_i); ``count`` pairs per class (each
    model on its own device, under ``precision``'s autocast)."""
    masks = sample_masks(mask_model, classes, count, settings=settings, seed=seed,
                         precision=precision)
    if not len(masks):
        return masks
    condition = torch.from_numpy(masks.masks).float()[:, None]
    images = sample(image_model, len(masks), settings=settings, seed=seed + 1, masks=condition,
                    precision=precision)
    images = ((images + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float32)
    return DefectPairs(np.clip(images, 0.0, 1.0), masks.masks, masks.classes).check("synthesized")
