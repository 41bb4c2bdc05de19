"""MSVT: the multi-scale vision transformer of Fed-MSVT, for anomaly segmentation.

Patch embedding (Z = W_e X_p + E_p, eq. 1) -> transformer stages at three or more resolutions
(H/8, H/16, H/32, ...) joined by hierarchical pooling -> an FPN decoder to a full-resolution
anomaly map, an image score, and a projection head whose embedding Contrastive Feature Alignment
uses.

The patch embedding reads either pixels (``backbone="none"``) or the frozen multi-scale features
of an ImageNet-pretrained backbone (``backbone="lite0"``). That backbone is frozen, stays in eval
mode and never leaves a site: :func:`fedad.models.state.trainable_state_dict` is what federated
learning exchanges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from fedad.models._registry import register_model
from fedad.models.backbones import create_backbone


@dataclass
class MSVTOutput:
    """anomaly_logits [B, 1, H, W], image_logit [B], embedding [B, D]."""

    anomaly_logits: torch.Tensor
    image_logit: torch.Tensor
    embedding: torch.Tensor


class PixelStem(nn.Module):
    """Trainable stem from pixels: a conv stem for stride-4 detail and 8x8 patch tokens (eq. 1)."""

    def __init__(self, image_size: int, fine_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.fine = nn.Sequential(
            nn.Conv2d(3, fine_dim, 3, 2, 1), nn.GroupNorm(8, fine_dim), nn.GELU(),
            nn.Conv2d(fine_dim, fine_dim, 3, 2, 1), nn.GroupNorm(8, fine_dim), nn.GELU(),
        )
        self.patch = PatchEmbed(image_size, patch_size=8, in_chans=3, embed_dim=embed_dim,
                                flatten=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] -> (fine [B,C,H/4,W/4], tokens W_e X_p [B,D,H/8,W/8])."""
        return self.fine(images), self.patch(images)


class PretrainedStem(nn.Module):
    """Frozen backbone features (strides 4, 8, 16) fused into H/8 patch tokens."""

    def __init__(self, name: str, embed_dim: int, fine_dim: int, pretrained: bool,
                 checkpoint: str | None = None) -> None:
        super().__init__()
        weights = "file" if checkpoint else "packaged" if pretrained else "none"
        self.backbone = create_backbone(name, weights=weights, checkpoint=checkpoint or None,
                                        out_indices=(1, 2, 3))
        if self.backbone.strides != [4, 8, 16]:
            raise ValueError(f"backbone {name}: expected strides 4/8/16, "
                             f"got {self.backbone.strides}")
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        c4, c8, c16 = self.backbone.channels
        self.fine = nn.Sequential(nn.Conv2d(c4, fine_dim, 1), nn.GELU())
        self.patch = nn.Conv2d(c4 + c8 + c16, embed_dim, 1)

    def train(self, mode: bool = True) -> PretrainedStem:
        """Train the projections; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] -> (fine [B,C,H/4,W/4], tokens [B,D,H/8,W/8])."""
        with torch.no_grad():
            f4, f8, f16 = self.backbone(images)
        fused = torch.cat([F.avg_pool2d(f4, 2), f8, _upsample_to(f16, f8)], dim=1)
        return self.fine(f4), self.patch(fused)


class HierarchicalPool(nn.Module):
    """2x2 average pooling of a token grid followed by a channel projection."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C', h/2, w/2]."""
        pooled = F.avg_pool2d(grid, 2)
        tokens = self.proj(self.norm(pooled.flatten(2).transpose(1, 2)))
        return tokens.transpose(1, 2).reshape(grid.shape[0], -1, *pooled.shape[-2:])


class TransformerStage(nn.Module):
    """``depth`` ViT blocks with full self-attention over an h x w token grid."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, grid: int,
                 drop_path: float) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C, h, w]."""
        b, c, h, w = grid.shape
        tokens = grid.flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


@register_model("msvt")
class MSVT(nn.Module):
    """Multi-scale vision transformer for anomaly segmentation (Fed-MSVT).

    Stage i works on an (H / 8 / 2^i) grid of tokens; at 128 px the three default stages see
    256, 64 and 16 tokens.

    Args:
        image_size: input side H = W, a multiple of 8 * 2^(stages - 1) (32 for three stages).
        backbone: ``lite0`` (frozen pretrained stem; any timm name with strides 4/8/16 works)
            or ``none`` (trainable pixel stem).
        embed_dims: token width of each stage (three or more stages).
        depths: ViT blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP hidden width / token width.
        decoder_dim: width of the FPN decoder.
        pixel_dim: width of the full-resolution refinement branch.
        proj_dim: width D of the CFA projection embedding.
        drop_path: stochastic depth rate of the blocks.
        pretrained: load the packaged ImageNet weights into the stem's backbone.
        backbone_checkpoint: a local state-dict file for the stem's timm backbone (any timm
            model whose levels 1-3 have strides 4/8/16, e.g. ``resnet18``).
    """

    frozen_prefixes: tuple[str, ...] = ("stem.backbone.",)

    def __init__(
        self,
        image_size: int = 128,
        backbone: str = "lite0",
        embed_dims: Sequence[int] = (96, 128, 160),
        depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (2, 4, 4),
        mlp_ratio: float = 2.0,
        decoder_dim: int = 64,
        pixel_dim: int = 8,
        proj_dim: int = 128,
        drop_path: float = 0.0,
        pretrained: bool = True,
        backbone_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        num_stages = len(embed_dims)
        if num_stages < 3 or not len(depths) == len(num_heads) == num_stages:
            raise ValueError(f"embed_dims, depths, num_heads: need three or more stages, one "
                             f"entry each; got {embed_dims}, {depths}, {num_heads}")
        coarsest = 8 * 2 ** (num_stages - 1)
        if image_size % coarsest:
            raise ValueError(f"image_size={image_size}: must be a multiple of {coarsest}")
        self.image_size = image_size
        fine_dim = decoder_dim // 2
        self.stem: nn.Module = (
            PixelStem(image_size, fine_dim, embed_dims[0]) if backbone == "none"
            else PretrainedStem(backbone, embed_dims[0], fine_dim, pretrained,
                                backbone_checkpoint)
        )
        self.stages = nn.ModuleList(
            TransformerStage(dim, depth, heads, mlp_ratio, image_size // 8 // 2**i, drop_path)
            for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads, strict=True))
        )
        self.pools = nn.ModuleList(
            HierarchicalPool(embed_dims[i], embed_dims[i + 1]) for i in range(num_stages - 1)
        )
        self.laterals = nn.ModuleList(nn.Conv2d(d, decoder_dim, 1) for d in embed_dims)
        self.fine_lateral = nn.Conv2d(fine_dim, decoder_dim, 1)
        self.decoder_fuse = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1), nn.GroupNorm(8, decoder_dim),
            nn.GELU(), nn.Conv2d(decoder_dim, pixel_dim, 1),
        )
        self.pixel_branch = nn.Sequential(  # full-resolution detail for thin defects
            nn.Conv2d(3, pixel_dim, 3, padding=1), nn.GELU(),
            nn.Conv2d(pixel_dim, pixel_dim, 3, padding=1), nn.GELU(),
        )
        self.pixel_head = nn.Sequential(
            nn.Conv2d(2 * pixel_dim, pixel_dim, 1), nn.GELU(),
            nn.Conv2d(pixel_dim, 1, 3, padding=1),
        )
        self.image_head = nn.Sequential(
            nn.Linear(embed_dims[-1] + 2, 64), nn.GELU(), nn.Linear(64, 1)
        )
        self.projection = nn.Sequential(
            nn.Linear(embed_dims[-1], embed_dims[-1]), nn.GELU(),
            nn.Linear(embed_dims[-1], proj_dim),
        )

    def forward(self, images: torch.Tensor) -> MSVTOutput:
        """images [B, 3, H, W] in [0, 1] -> MSVTOutput (logits [B,1,H,W], [B], embedding [B,D]).

        Raises:
            AssertionError: wrong input shape.
            RuntimeError: non-finite outputs (``torch._assert_async``: no host sync; on an
                accelerator it fails as a device-side assert instead).
        """
        torch._assert(
            images.dim() == 4 and images.shape[1] == 3
            and images.shape[-1] == self.image_size and images.shape[-2] == self.image_size,
            f"MSVT expects [B, 3, {self.image_size}, {self.image_size}] images, "
            f"got {list(images.shape)}",
        )
        fine, grid = self.stem(images)
        levels = []
        for i, stage in enumerate(self.stages):
            grid = stage(self.pools[i - 1](grid) if i else grid)
            levels.append(grid)
        decoded = self.laterals[-1](levels[-1])
        for lateral, level in zip(self.laterals[-2::-1], levels[-2::-1], strict=True):
            decoded = _upsample_to(decoded, level) + lateral(level)
        decoded = _upsample_to(decoded, fine) + self.fine_lateral(fine)
        coarse = _upsample_to(self.decoder_fuse(decoded), images)
        logits = self.pixel_head(torch.cat([coarse, self.pixel_branch(images)], dim=1))
        pooled = levels[-1].mean(dim=(2, 3))
        flat = logits.flatten(1)
        summary = torch.stack([flat.amax(1), flat.mean(1)], dim=1)
        image_logit = self.image_head(torch.cat([pooled, summary], dim=1)).squeeze(1)
        # image_logit depends on the map's max/mean and the deepest tokens: NaN/inf shows there
        torch._assert_async(torch.isfinite(image_logit).all(), "MSVT: non-finite outputs")
        return MSVTOutput(logits, image_logit, self.projection(pooled))


def _upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of x [B, C, h, w] to reference's spatial size."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)
