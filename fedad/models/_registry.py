"""Model registry (timm style): model files decorate their constructors with ``register_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model class or factory under ``name`` (names are unique)."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
