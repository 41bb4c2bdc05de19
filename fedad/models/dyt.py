"""Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization").

``DyT(x) = gamma * tanh(alpha * x) + beta`` with a learnable scalar ``alpha`` and per-channel
``gamma`` / ``beta`` over the last dimension. It has LayerNorm's constructor shape
(``DyT(num_features)``), so it drops into any timm-style block as ``norm_layer``;
:func:`norm_layer` is the switch between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NORM_LAYERS = ("dyt", "layernorm")


class DyT(nn.Module):
    """Element-wise ``gamma * tanh(alpha * x) + beta`` over inputs [..., num_features].

    Args:
        num_features: size of the last dimension (the channels gamma and beta act on).
        alpha_init: initial value of the scalar alpha (0.5 in the paper for ViTs).
        device, dtype: where and how to allocate the parameters (timm passes them).
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"DyT: num_features={num_features} must be >= 1")
        self.num_features = num_features
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init), **factory))
        self.gamma = nn.Parameter(torch.ones(num_features, **factory))
        self.beta = nn.Parameter(torch.zeros(num_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"DyT: last dim {x.shape[-1]} != num_features {self.num_features}")
        return self.gamma * torch.tanh(self.alpha * x) + self.beta

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha={self.alpha.item():.3g}"


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    """The normalization constructor ``(dim) -> module`` named ``name`` ("dyt" | "layernorm"),
    as timm blocks take it for ``norm_layer``."""
    if name == "dyt":
        return DyT
    if name == "layernorm":
        return nn.LayerNorm
    raise ValueError(f"norm={name!r}: expected one of {', '.join(NORM_LAYERS)}")
