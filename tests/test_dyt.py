"""Dynamic Tanh: the formula, its gradients, and the LayerNorm switch in timm blocks."""

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from fedad.models import DyT
from fedad.models.dyt import norm_layer


def test_dyt_equals_formula_on_given_parameters():
    layer = DyT(4)
    with torch.no_grad():
        layer.alpha.fill_(0.7)
        layer.gamma.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        layer.beta.copy_(torch.tensor([0.1, 0.0, -0.3, 2.0]))
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    expected = layer.gamma * torch.tanh(0.7 * x) + layer.beta
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(torch.zeros(1, 4)), layer.beta[None])  # tanh(0) = 0


def test_dyt_gradient_reaches_alpha_gamma_beta():
    layer = DyT(3, alpha_init=0.5)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    layer(x).pow(2).sum().backward()
    for name in ("alpha", "gamma", "beta"):
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # d/d alpha of sum(gamma * tanh(alpha x) + beta)^2 with gamma = 1, beta = 0
    y = torch.tanh(0.5 * x)
    expected = (2 * y * (1 - y ** 2) * x).sum()
    torch.testing.assert_close(layer.alpha.grad, expected.view(1))


def test_norm_switch_builds_timm_blocks_with_either_norm():
    for name, kind in (("dyt", DyT), ("layernorm", nn.LayerNorm)):
        block = Block(16, 2, norm_layer=norm_layer(name))
        assert isinstance(block.norm1, kind) and isinstance(block.norm2, kind)
        out = block(torch.randn(2, 5, 16))
        assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        norm_layer("batchnorm")
    with pytest.raises(ValueError, match="last dim"):
        DyT(4)(torch.zeros(2, 3))
