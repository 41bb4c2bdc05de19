"""What the masked autoencoder's anomaly map measures (``mae-inference-passes``, ``mae-error``).

The seed scores the reconstruction of the whole, unmasked image by its squared pixel error.
A MAE shown the whole image learns to copy it, anomalies included, so that error does not
separate defects from normal texture (image AUROC 0.50 in fedad's synthetic table). Two known
fixes of reconstruction detectors, both switchable:

- Inference masking: ``passes`` fixed complementary masks split the patches into ``passes``
  equal visible groups; pass k shows group k and reconstructs the rest. Every patch is then
  reconstructed from context only, ``passes - 1`` times, and the mean of those is its
  reconstruction (``passes=0``: the seed's single unmasked pass).
- Feature-space error: the cosine distance between frozen ImageNet features (EfficientNet-Lite0
  levels ``MAE_FEATURE_LAYERS``) of the image and of its reconstruction at each position,
  upsampled to the image; a blurred but faithful reconstruction costs little there, a missing
  scratch costs much (``error="pixel"``: the seed's squared error, mean over RGB).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

ERRORS = ("pixel", "feature")
MAE_FEATURE_LAYERS = (0, 1, 2)
"""Lite0 levels of the feature-space error (strides 2, 4, 8: defects are small)."""


def complementary_masks(grid: int, passes: int, seed: int = 0) -> torch.Tensor:
    """bool [passes, grid * grid], True = hidden: a seeded permutation of the patches cut into
    ``passes`` groups (sizes differing by at most one); pass k hides every group but k."""
    if passes < 2 or passes > grid * grid:
        raise ValueError(f"mae-inference-passes={passes}: must be 0 or in [2, {grid * grid}]")
    order = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(seed))
    masks = torch.ones(passes, grid * grid, dtype=torch.bool)
    for k, group in enumerate(order.tensor_split(passes)):
        masks[k, group] = False
    return masks


def inference_masks(grid: int, passes: int, seed: int = 0) -> torch.Tensor | None:
    """The masks of ``mae-inference-passes``: :func:`complementary_masks`, or None for 0 (the
    seed's single unmasked pass)."""
    return None if passes == 0 else complementary_masks(grid, passes, seed)


def masked_reconstruction(model: nn.Module, images: torch.Tensor,
                          masks: torch.Tensor | None) -> torch.Tensor:
    """images [B, 3, H, W] -> reconstruction [B, 3, H, W], each patch the mean of its
    reconstructions from the passes of ``masks`` (bool [P, N], :func:`inference_masks`) that
    hid it; the model's single unmasked reconstruction for None."""
    if masks is None:
        return model(images).reconstruction
    total = torch.zeros_like(images)
    count = torch.zeros(1, 1, *images.shape[-2:], device=images.device)
    for mask in masks.to(images.device):
        output = model(images, mask=mask.expand(images.shape[0], -1))
        hidden = patch_mask_to_pixels(mask, model.grid, model.patch_size)  # [1, 1, H, W]
        total = total + output.reconstruction * hidden
        count = count + hidden
    return total / count


def patch_mask_to_pixels(mask: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """bool [grid * grid] (row-major patches) -> float [1, 1, grid * p, grid * p]."""
    cells = mask.view(1, 1, grid, grid).float()
    return cells.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


@functools.cache
def _lite0_levels() -> nn.Module:
    """The frozen Lite0 of the feature-space error (built once per process)."""
    from fedad.models.backbones import create_backbone

    return create_backbone("lite0", out_indices=MAE_FEATURE_LAYERS).eval().requires_grad_(False)


def error_extractor(error: str) -> nn.Module | None:
    """The feature extractor of ``mae-error`` (:data:`ERRORS`): the frozen Lite0 levels for
    ``feature``, None for ``pixel``; ValueError naming the key otherwise."""
    if error not in ERRORS:
        raise ValueError(f"mae-error={error!r}: expected one of {', '.join(ERRORS)}")
    return _lite0_levels() if error == "feature" else None


def feature_error(extractor: nn.Module, images: torch.Tensor, reconstruction: torch.Tensor
                  ) -> torch.Tensor:
    """images, reconstruction [B, 3, H, W] -> [B, H, W]: the mean over ``extractor``'s levels
    of 1 - cosine similarity of the two images' features at each position, upsampled."""
    size = images.shape[-2:]
    levels = extractor(torch.cat([images, reconstruction]))
    error = images.new_zeros((images.shape[0], *size))
    for level in levels:
        original, rebuilt = level.float().chunk(2)
        distance = 1 - F.cosine_similarity(original, rebuilt, dim=1, eps=1e-6)  # [B, h, w]
        error = error + F.interpolate(distance[:, None], size=size, mode="bilinear",
                                      align_corners=False)[:, 0]
    return error / len(levels)


def anomaly_error(model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None,
                  extractor: nn.Module | None) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> raw (unsmoothed) error map [B, H, W] of the MAE in
    eval mode between the images and their reconstructions (:func:`masked_reconstruction`
    with ``masks``): the feature-space error under ``extractor`` (:func:`error_extractor`),
    or the squared pixel error (mean over RGB) without one."""
    reconstruction = masked_reconstruction(model, images, masks).float()
    if extractor is not None:
        return feature_error(extractor.to(images.device), images, reconstruction)
    return ((reconstruction - images) ** 2).mean(1)
