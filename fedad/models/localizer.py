"""A plain U-Net (Ronneberger et al.) that maps an image to a one-channel defect-logit map: the
detection/localization network of D-ADDA (F_det/loc of eq. 8)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedad.models._registry import register_model


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


@register_model("unet_localizer")
class UNetLocalizer(nn.Module):
    """Encoder-decoder with skip connections; ``depth`` max-pool halvings.

    Args:
        base_channels: channels of the first level (doubled per level).
        depth: number of down/up-sampling steps; inputs must be multiples of 2^depth.
    """

    def __init__(self, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            [_double_conv(3, widths[0])]
            + [_double_conv(widths[i], widths[i + 1]) for i in range(depth)])
        self.decoder = nn.ModuleList(
            [_double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> defect logits [B, 1, H, W]."""
        if images.shape[-1] % 2**self.depth or images.shape[-2] % 2**self.depth:
            raise ValueError(f"UNetLocalizer: side {tuple(images.shape[-2:])} not a multiple "
                             f"of {2**self.depth}")
        skips = []
        h = images
        for level, block in enumerate(self.encoder):
            h = block(h if level == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        skips.pop()
        for block in self.decoder:
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.head(h)
