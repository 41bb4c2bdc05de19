"""The part of a model's state that federated learning exchanges (frozen modules stay home)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn


def trainable_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The state federated learning exchanges: every parameter and buffer outside the frozen
    pretrained modules named by ``model.frozen_prefixes`` (which never leave a site), as CPU
    tensors whatever the model's device."""
    return OrderedDict((k, v.cpu()) for k, v in _trainable_state(model).items())


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`trainable_state_dict` on the model's own device."""
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    return {k: v for k, v in model.state_dict().items() if not (frozen and k.startswith(frozen))}


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state_dict` output into ``model``, strictly.

    Raises:
        ValueError: a missing or unexpected key, or a wrong shape (all listed).
    """
    expected = _trainable_state(model)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"state does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
