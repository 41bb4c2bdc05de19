"""The D-ADDA denoising U-Net: residual blocks, multi-head self-attention in the intermediate and
bottleneck layers, optional class conditioning (classifier-free guidance) and the gated mask
cross-attention of D-ADDA eqs. (9)-(10).

One network serves the three roles of the paper:

- G^I (stage 2): unconditional image model, ``DiffusionUNet(in_channels=3)``;
- G^M (stage 2): mask model conditioned on the defect class, ``num_classes=K`` (index K is the
  "no class" token that classifier-free guidance trains with and samples against);
- G^I fine-tuned with mask cross-attention (stage 3): ``mask_conditioning=True``. Every module of
  the unconditional model keeps its name, so its weights load into the conditional model and only
  the mask embeddings, the defect/normal key-value projections and the mask-time projection are new.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fedad.models._registry import register_model


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the (time [+ mask]) embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W], emb [B, E] -> [B, Cout, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention, eqs. (5)-(6): q [B, Nq, D], k/v [B, Nk, D] -> [B, Nq, D]."""
    b, nq, d = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, nq, d)


class MaskEmbedding(nn.Module):
    """ME(.) of the paper: three Conv-ReLU-MaxPool blocks and a Conv to ``out_channels``.

    Maps a mask [B, 1, H, W] to features [B, out_channels, h, w] at the attention layer's
    resolution (average-pooled or upsampled from H / 8 when the layer is not at H / 8).
    """

    def __init__(self, out_channels: int, hidden: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(3):
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = hidden
        layers.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """mask [B, 1, H, W] -> [B, C, *size] (size None: [B, C, H / 8, W / 8])."""
        features = self.net(mask)
        if size is not None and features.shape[-2:] != size:
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return features


class AttentionBlock(nn.Module):
    """Multi-head self-attention (4 heads, d_h = 32 in the paper) with a residual connection,
    and, with ``mask_conditioning``, the gated mask cross-attention of eqs. (9)-(10):

        G_D   = sigmoid(GAP(Attn(Q, K_D, V_D)))        K_D, V_D from ME(M^D)
        G_1-D = sigmoid(GAP(Attn(Q, K_1-D, V_1-D)))    from ME(1 - M^D)
        x_SA  = Attn(Q, K, V)
        x_out = G_D * (x_SA + x_in) + G_1-D * (x_SA + x_in)

    The gates are per-channel ([B, C, 1, 1]) after projecting the attention outputs back to C.
    """

    def __init__(self, channels: int, heads: int, head_dim: int,
                 mask_conditioning: bool = False) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Linear(channels, 3 * inner)
        self.out = nn.Linear(inner, channels)
        self.mask_conditioning = mask_conditioning
        if mask_conditioning:
            self.embed_defect = MaskEmbedding(channels)
            self.embed_normal = MaskEmbedding(channels)
            self.kv_defect = nn.Linear(channels, 2 * inner)
            self.kv_normal = nn.Linear(channels, 2 * inner)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] (and mask [B, 1, H0, W0] in {0,1} if conditioned) -> [B, C, H, W]."""
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        x_sa = self.out(_heads_attention(q, k, v, self.heads)).transpose(1, 2).view(b, c, h, w)
        if not self.mask_conditioning:
            return x + x_sa
        if mask is None:
            raise ValueError("AttentionBlock: a mask-conditioned block needs a mask")
        gates = []
        for embed, kv, m in ((self.embed_defect, self.kv_defect, mask),
                             (self.embed_normal, self.kv_normal, 1.0 - mask)):
            keys, values = kv(embed(m, (h, w)).flatten(2).transpose(1, 2)).chunk(2, dim=-1)
            attended = self.out(_heads_attention(q, keys, values, self.heads))  # [B, HW, C]
            gates.append(torch.sigmoid(attended.mean(dim=1))[:, :, None, None])  # GAP -> [B,C,1,1]
        residual = x_sa + x
        return gates[0] * residual + gates[1] * residual


class DiffusionUNet(nn.Module):
    """Noise-prediction U-Net eps_theta(x_t, t [, class] [, mask]).

    Args:
        in_channels: 3 for images (G^I), 1 for masks (G^M).
        image_size: input side, a multiple of 2^(len(channel_mults) - 1).
        base_channels: channels of the first level.
        channel_mults: channel multiplier per resolution level (each level but the last halves
            the resolution).
        attention_levels: levels (0 = full resolution) with self-attention after their block;
            the bottleneck always has it. Default: the levels at 16 x 16 or coarser (the paper's
            "intermediate and bottleneck layers"; attention cost grows with the token count
            squared).
        heads, head_dim: multi-head attention shape (4 and 32 in the paper).
        num_classes: > 0 for class conditioning with classifier-free guidance; class index
            ``num_classes`` is the null class.
        mask_conditioning: add the gated mask cross-attention (eqs. 9-10) to every attention
            block and join a mask embedding to the time embedding.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        attention_levels: tuple[int, ...] | None = None,
        heads: int = 4,
        head_dim: int = 32,
        num_classes: int = 0,
        mask_conditioning: bool = False,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"DiffusionUNet: image_size={image_size} not a multiple of {factor}")
        if attention_levels is None:
            attention_levels = tuple(level for level in range(len(channel_mults))
                                     if image_size // 2**level <= 16)
        self.in_channels, self.image_size = in_channels, image_size
        self.num_classes, self.mask_conditioning = num_classes, mask_conditioning
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        if mask_conditioning:
            # Mask vector concatenated with the time embedding and projected back onto it; the
            # projection starts at zero so the fine-tuned model starts as the pretrained one.
            self.mask_vector = MaskEmbedding(emb_dim)
            self.mask_time = nn.Linear(2 * emb_dim, emb_dim)
            nn.init.zeros_(self.mask_time.weight)
            nn.init.zeros_(self.mask_time.bias)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, heads, head_dim, mask_conditioning)

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        skips = [base_channels]
        channels = base_channels
        for level, width in enumerate(widths):
            stage = nn.ModuleDict({"block": ResBlock(channels, width, emb_dim)})
            if level in attention_levels:
                stage["attn"] = attention(width)
            if level < len(widths) - 1:
                stage["pool"] = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.down.append(stage)
            channels = width
            skips.append(width)
        self.mid_block1 = ResBlock(channels, channels, emb_dim)
        self.mid_attn = attention(channels)
        self.mid_block2 = ResBlock(channels, channels, emb_dim)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            stage = nn.ModuleDict({"block": ResBlock(channels + skips.pop(), width, emb_dim)})
            if level in attention_levels:
                stage["attn"] = attention(width)
            if level > 0:
                stage["upsample"] = nn.Conv2d(width, width, 3, padding=1)
            self.up.append(stage)
            channels = width
        self.head = nn.Sequential(nn.GroupNorm(_groups(channels + skips[0]), channels + skips[0]),
                                  nn.SiLU(), nn.Conv2d(channels + skips[0], in_channels, 3,
                                                       padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                classes: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for x_t.

        Args:
            x: noisy input [B, in_channels, S, S] (S = image_size).
            timesteps: [B] integer diffusion steps.
            classes: [B] int64 in [0, num_classes] (num_classes = unconditional) if
                ``num_classes`` > 0.
            mask: [B, 1, S, S] {0,1} defect mask if ``mask_conditioning``.
        Returns:
            noise prediction [B, in_channels, S, S].
        """
        b = x.shape[0]
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"DiffusionUNet: input {tuple(x.shape)} != "
                             f"[B, {self.in_channels}, {self.image_size}, {self.image_size}]")
        emb = self.time_mlp(timestep_embedding(timesteps.expand(b), self.base_channels))
        if self.num_classes > 0:
            if classes is None:
                raise ValueError("DiffusionUNet: a class-conditioned model needs classes")
            emb = emb + self.class_emb(classes)
        if self.mask_conditioning:
            if mask is None or mask.shape != (b, 1, *x.shape[2:]):
                raise ValueError(f"DiffusionUNet: mask must be [B, 1, {self.image_size}, "
                                 f"{self.image_size}], got {None if mask is None else mask.shape}")
            mask_vector = self.mask_vector(mask).mean(dim=(2, 3))  # GAP -> [B, emb_dim]
            emb = emb + self.mask_time(torch.cat([emb, mask_vector], dim=1))
        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            h = stage["block"](h, emb)
            if "attn" in stage:
                h = stage["attn"](h, mask)
            skips.append(h)
            if "pool" in stage:
                h = stage["pool"](h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb), mask), emb)
        for stage in self.up:
            h = stage["block"](torch.cat([h, skips.pop()], dim=1), emb)
            if "attn" in stage:
                h = stage["attn"](h, mask)
            if "upsample" in stage:
                h = stage["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(torch.cat([h, skips.pop()], dim=1))


@register_model("dadda_unet")
def dadda_unet(**kwargs) -> DiffusionUNet:
    """The D-ADDA diffusion U-Net (see :class:`DiffusionUNet` for the arguments)."""
    return DiffusionUNet(**kwargs)
