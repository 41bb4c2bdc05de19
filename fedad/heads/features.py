"""Patch feature extractors for the feature heads (PatchCore-style locally aware features).

Three sources, one output form ``[B, D, h, w]`` at the stride of the finest chosen level:

- ``lite0``: the packaged ImageNet EfficientNet-Lite0 (:func:`fedad.models.create_backbone`);
- any timm model by name, with weights from ``backbone-checkpoint`` (never downloaded);
- ``msvt``: the token grids of a trained MSVT's transformer stages, from an MSVT checkpoint
  (a results folder's ``checkpoints/*.pt`` or a plain trainable state dict).

Each level is averaged over a ``neighbourhood`` x ``neighbourhood`` window (PatchCore's local
aggregation: a patch feature sees its surroundings), resized to the finest level and the levels
are concatenated along channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedad.models import FeatureBackbone, create_backbone, create_model, load_trainable_state_dict
from fedad.models.backbones import BackboneError


class PatchFeatureExtractor(nn.Module):
    """Frozen multi-level feature model -> locally aggregated patch features.

    Args:
        levels: a module mapping images [B, 3, H, W] in [0, 1] to a list of maps [B, C_i, ...].
        channels: C_i of each level (their sum is the feature width D).
        neighbourhood: side of the averaging window (odd; 1 = no aggregation).
    """

    def __init__(self, levels: nn.Module, channels: Sequence[int], neighbourhood: int = 3) -> None:
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"feature-neighbourhood={neighbourhood}: must be odd and >= 1")
        self.levels = levels.eval()
        for param in self.levels.parameters():
            param.requires_grad_(False)
        self.dim = int(sum(channels))
        self.neighbourhood = neighbourhood

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """The extractor is always frozen (eval mode)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> patch features [B, D, h, w] (finest chosen level)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {list(images.shape)}")
        maps = self.levels(images)
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0])
        pad = self.neighbourhood // 2
        pooled = [
            F.interpolate(
                F.avg_pool2d(m, self.neighbourhood, stride=1, padding=pad,
                             count_include_pad=False),
                size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        features = torch.cat(pooled, dim=1)
        if features.shape[1] != self.dim or not torch.isfinite(features).all():
            raise FloatingPointError(f"patch features: width {features.shape[1]} (expected "
                                     f"{self.dim}) or non-finite values")
        return features


class MSVTStages(nn.Module):
    """The token grids [B, C_i, H/8/2^i, W/8/2^i] of chosen stages of a trained MSVT."""

    def __init__(self, model: nn.Module, stages: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.stages = tuple(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> [[B, C_i, h_i, w_i] for each chosen stage]."""
        _, grid = self.model.stem(images)
        outputs = []
        for i, stage in enumerate(self.model.stages[: max(self.stages) + 1]):
            grid = stage(self.model.pools[i - 1](grid) if i else grid)
            if i in self.stages:
                outputs.append(grid)
        return outputs


def load_msvt(checkpoint: str | Path, image_size: int, backbone: str) -> nn.Module:
    """An MSVT (eval mode) with the trainable weights of ``checkpoint`` on a pretrained
    ``backbone`` stem. BackboneError naming the file when it does not fit."""
    path = Path(checkpoint)
    if not path.is_file():
        raise BackboneError(f"feature-checkpoint={str(path)!r}: no such MSVT checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = create_model("msvt", image_size=image_size, backbone=backbone)
    try:
        load_trainable_state_dict(model, state)
    except ValueError as err:
        raise BackboneError(f"feature-checkpoint={str(path)!r}: {err}") from err
    return model.eval()


def build_extractor(source: str, *, layers: Sequence[int], neighbourhood: int, image_size: int,
                    checkpoint: str = "", msvt_backbone: str = "lite0") -> PatchFeatureExtractor:
    """The patch feature extractor of ``source`` (``lite0``, a timm name, or ``msvt``).

    Args:
        layers: backbone feature levels (timm ``out_indices``) or MSVT stage indices.
        checkpoint: weights file: a full timm state dict for a timm name, an MSVT checkpoint
            for ``msvt``; unused for ``lite0`` (the packaged weights).
        msvt_backbone: the stem backbone the MSVT was trained with.
    """
    if source == "msvt":
        if not checkpoint:
            raise BackboneError("feature-source='msvt' needs feature-checkpoint (an MSVT .pt)")
        model = load_msvt(checkpoint, image_size, msvt_backbone)
        dims = [model.stages[i].norm.normalized_shape[0] for i in layers]
        return PatchFeatureExtractor(MSVTStages(model, layers), dims, neighbourhood)
    backbone: FeatureBackbone = create_backbone(
        source, pretrained=source == "lite0", checkpoint=checkpoint or None, out_indices=layers)
    return PatchFeatureExtractor(backbone, backbone.channels, neighbourhood)
