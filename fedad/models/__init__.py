"""Model registry (timm style): ``create_model(name, **kwargs)``, plus federated-state helpers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from fedad.models.msvt import MSVT, MSVTOutput

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model constructor under ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names raise ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


register_model("msvt")(MSVT)


def trainable_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The state that federated learning exchanges: all of it but the frozen pretrained parts."""
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    return OrderedDict(
        (k, v) for k, v in model.state_dict().items() if not frozen or not k.startswith(frozen)
    )


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state_dict` output strictly (same keys, same shapes)."""
    expected = trainable_state_dict(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"state does not fit {type(model).__name__}: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(value.shape)}")
    model.load_state_dict(state, strict=False)


__all__ = [
    "MSVT", "MSVTOutput", "create_model", "list_models", "load_trainable_state_dict",
    "register_model", "trainable_state_dict",
]
