"""Masked autoencoder for anomaly detection with Dynamic Tanh (MAE-DyT, seed 004).

A ViT encoder sees only the visible patches (fixed 2D sine-cosine position embeddings); a
lighter decoder (asymmetric depths) fills the masked positions with a learned mask token and
reconstructs every patch. Block masking hides ``mask_ratio`` of the patches in training; in
eval mode the encoder sees the full image unless a mask is given (fedad.mae.scoring's
inference masking), and the reconstruction error is the anomaly signal. ``norm="dyt"`` puts
:class:`fedad.models.dyt.DyT` in place of every LayerNorm.

The model also carries its decision thresholds (buffers ``pixel_threshold`` and
``image_threshold``) so that federated averaging averages them with the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fedad.models._registry import register_model
from fedad.models.dyt import norm_layer


@dataclass
class MAEOutput:
    """reconstruction [B, 3, H, W] in [0, 1], mask [B, N] (True = hidden from the encoder),
    embedding [B, D] (mean of the encoder's output tokens)."""

    reconstruction: torch.Tensor
    mask: torch.Tensor
    embedding: torch.Tensor


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings [grid * grid, dim] (MAE): half the channels
    encode the row, half the column, each as sin/cos at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sincos_position_embedding: dim={dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]  # [N, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [N, D/2]

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def block_mask(batch: int, grid: int, ratio: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Block-wise masks (BEiT style) hiding exactly ``round(ratio * grid**2)`` patches each.

    Rectangles of random area (at least 4 patches, at most what is still to hide) and aspect
    ratio in [0.3, 3.3] are hidden until the target count is reached; the last rectangle is
    trimmed to a random subset of its new patches so the count is exact (the encoder batches
    the same number of visible tokens per image).

    Args:
        batch: number of masks; grid: patches per side; ratio: fraction in [0, 1).
    Returns:
        bool [batch, grid * grid], True = hidden, row-major patch order.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mae-mask-ratio={ratio}: must be in [0, 1)")
    total = grid * grid
    target = round(ratio * total)
    masks = torch.zeros(batch, grid, grid, dtype=torch.bool)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def randint(high: int) -> int:
        return int(torch.randint(high, (), generator=generator))

    for mask in masks:
        while (hidden := int(mask.sum())) < target:
            area = uniform(min(4, target - hidden), target - hidden)
            aspect = math.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
            h = min(grid, max(1, round(math.sqrt(area * aspect))))
            w = min(grid, max(1, round(math.sqrt(area / aspect))))
            top, left = randint(grid - h + 1), randint(grid - w + 1)
            block = torch.zeros_like(mask)
            block[top:top + h, left:left + w] = True
            new = (block & ~mask).flatten().nonzero().flatten()
            keep = new[torch.randperm(len(new), generator=generator)[:target - hidden]]
            mask.view(-1)[keep] = True
    return masks.view(batch, total)


class PatchTransformer(nn.Module):
    """``depth`` timm ViT blocks and a final norm over tokens [B, N, dim]."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm: str) -> None:
        super().__init__()
        layer = norm_layer(norm)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=layer)
            for _ in range(depth)
        ])
        self.norm = layer(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, dim]."""
        return self.norm(self.blocks(tokens))


@register_model("mae")
class MaskedAutoencoder(nn.Module):
    """Masked autoencoder over ``patch_size`` patches of an ``image_size`` RGB image.

    Args:
        image_size: input side in pixels (a multiple of ``patch_size``).
        patch_size: patch side in pixels (16 in the seed at 256 px).
        embed_dim, depth, num_heads: the encoder ViT.
        decoder_dim, decoder_depth, decoder_heads: the (lighter) decoder ViT.
        mlp_ratio: hidden size of the blocks' MLPs relative to their width.
        norm: "dyt" (Dynamic Tanh) or "layernorm", used in every block and final norm.
        mask_ratio: fraction of patches block-masked in training (0.75 in the seed).
    """

    def __init__(self, image_size: int = 128, patch_size: int = 16, embed_dim: int = 192,
                 depth: int = 6, num_heads: int = 3, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, mlp_ratio: float = 4.0,
                 norm: str = "dyt", mask_ratio: float = 0.75) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"mae: image_size={image_size} is not a multiple of "
                             f"patch_size={patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mae-mask-ratio={mask_ratio}: must be in [0, 1)")
        self.image_size, self.patch_size, self.mask_ratio = image_size, patch_size, mask_ratio
        self.grid = image_size // patch_size
        self.norm_name = norm
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.register_buffer("encoder_pos", sincos_position_embedding(self.grid, embed_dim),
                             persistent=False)
        self.encoder = PatchTransformer(embed_dim, depth, num_heads, mlp_ratio, norm)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_position_embedding(self.grid, decoder_dim),
                             persistent=False)
        self.decoder = PatchTransformer(decoder_dim, decoder_depth, decoder_heads, mlp_ratio,
                                        norm)
        self.head = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self.register_buffer("pixel_threshold", torch.ones(1))
        self.register_buffer("image_threshold", torch.ones(1))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> MAEOutput:
        """images [B, 3, H, W] in [0, 1] -> :class:`MAEOutput`.

        ``mask`` (bool [B, N], True = hidden, the same count in every row) hides those
        patches; without it, training mode hides ``mask_ratio`` of the patches in blocks
        (drawn with ``generator``, or torch's global generator) and eval mode hides nothing.
        """
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"mae: expected [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")
        batch = images.shape[0]  # a traced size: an exported graph takes any batch
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.encoder_pos
        if mask is None:
            ratio = self.mask_ratio if self.training else 0.0
            mask = block_mask(batch, self.grid, ratio, generator).to(images.device)
        elif mask.shape != (batch, self.grid ** 2) or len(set(mask.sum(1).tolist())) > 1:
            raise ValueError(f"mae: mask must be bool [{batch}, {self.grid ** 2}] hiding as many "
                             f"patches in every row, got {tuple(mask.shape)}")
        visible = tokens[~mask].view(batch, -1, tokens.shape[-1])
        encoded = self.encoder(visible)  # [B, N_visible, D]
        decoded = self.mask_token.expand(batch, self.grid ** 2, -1).clone()
        decoded[~mask] = self.decoder_embed(encoded).flatten(0, 1)
        patches = torch.sigmoid(self.head(self.decoder(decoded + self.decoder_pos)))
        return MAEOutput(reconstruction=self.unpatchify(patches), mask=mask,
                         embedding=encoded.mean(dim=1))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, N, p * p * 3] -> [B, 3, H, W]."""
        p, g = self.patch_size, self.grid
        x = patches.view(patches.shape[0], g, g, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], 3, g * p, g * p)


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias (as in MAE)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
