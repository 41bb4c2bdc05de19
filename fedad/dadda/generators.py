"""Stage 2 of D-ADDA on the server: G^I (unconditional DDPM) on the accepted uploads' normal
images and G^M (class-conditional DDPM, classifier-free guidance) on their masks, and the one
ArrayRecord that carries both to the sites (keys ``image-model.<name>`` / ``mask-model.<name>``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedad.dadda.diffusion import train_diffusion
from fedad.dadda.payload import ServerUpload
from fedad.dadda.settings import DADDASettings
from fedad.device import CPU
from fedad.models.diffusion_unet import DiffusionUNet

log = logging.getLogger(__name__)

IMAGE_MODEL, MASK_MODEL = "image-model", "mask-model"


def train_generators(uploads: Sequence[ServerUpload], settings: DADDASettings, num_types: int,
                     seed: int, device: torch.device = CPU,
                     precision: str = "32"
                     ) -> tuple[DiffusionUNet, DiffusionUNet, dict[str, float]]:
    """G^I on the uploads' normal images [N, 3, S, S], G^M on their masks [M, S, S] by defect
    class, trained on ``device`` under ``precision``'s autocast; the EMA models (on ``device``)
    and statistics (sizes, losses, seconds)."""
    images = np.concatenate([u.normal_images for u in uploads])
    masks = np.concatenate([u.masks for u in uploads])
    classes = np.concatenate([u.mask_classes for u in uploads]) - 1  # 0 is "good"
    size = settings.dadda_diffusion_size
    if not len(images) or not len(masks):
        raise RuntimeError(f"stage 2: accepted uploads hold {len(images)} normal images and "
                           f"{len(masks)} masks; both models need at least one")
    if images.shape[2:] != (size, size) or masks.shape[1:] != (size, size):
        raise RuntimeError(f"stage 2: uploads of {images.shape[2:]} / {masks.shape[1:]} px, "
                           f"dadda-diffusion-size={size}")
    image_model, image_stats = train_diffusion(
        DiffusionUNet(**settings.unet_kwargs(3)).to(device), torch.from_numpy(images) * 2 - 1,
        settings=settings, iterations=settings.dadda_train_iterations, seed=seed, name="G^I",
        precision=precision)
    mask_model, mask_stats = train_diffusion(
        DiffusionUNet(**settings.unet_kwargs(1, num_classes=num_types)).to(device),
        torch.from_numpy(masks).float()[:, None] * 2 - 1, settings=settings,
        iterations=settings.dadda_train_iterations, seed=seed + 1,
        classes=torch.from_numpy(classes), name="G^M", precision=precision)
    stats = {"normal_images": len(images), "masks": len(masks),
             "image_model_loss": image_stats["loss"], "mask_model_loss": mask_stats["loss"],
             "image_model_seconds": image_stats["seconds"],
             "mask_model_seconds": mask_stats["seconds"]}
    log.info("stage 2: %s", stats)
    return image_model, mask_model, stats


def pack_generators(image_model: DiffusionUNet, mask_model: DiffusionUNet) -> ArrayRecord:
    """Both generators' state dicts as one ArrayRecord (CPU arrays, whatever their device)."""
    return ArrayRecord({f"{prefix}.{name}": value
                        for prefix, model in ((IMAGE_MODEL, image_model), (MASK_MODEL, mask_model))
                        for name, value in model.state_dict().items()})


def unpack_generators(arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
    """(G^I state dict, G^M state dict) of :func:`pack_generators` output (ValueError if a
    key belongs to neither)."""
    parts: dict[str, dict[str, torch.Tensor]] = {IMAGE_MODEL: {}, MASK_MODEL: {}}
    for key, value in arrays.to_torch_state_dict().items():
        prefix, _, name = key.partition(".")
        if prefix not in parts:
            raise ValueError(f"generators record: key {key!r} is neither {IMAGE_MODEL}.* "
                             f"nor {MASK_MODEL}.*")
        parts[prefix][name] = value
    return parts[IMAGE_MODEL], parts[MASK_MODEL]
