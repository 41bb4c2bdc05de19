"""Checkpointable state of Flower's own strategies: the server optimizers' buffers (FedAdam /
FedYogi / FedAdagrad moments ``m_t``, ``v_t``; FedAvgM's ``momentum_vector``) and the clipping
norm of Flower's adaptive-clipping DP wrappers.

Flower keeps them as numpy arrays on the strategy object; they are stored as tensors so that
checkpoints load with ``torch.load(weights_only=True)``. The arrays the strategies also keep of
the current global model (``current_arrays``) are not stored: a resumed run passes the
checkpointed global model to ``configure_train``, which sets them again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BUFFERS = ("m_t", "v_t", "momentum_vector")
SCALARS = ("clipping_norm",)


def _to_tensors(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()}
    return [torch.from_numpy(np.ascontiguousarray(v)) for v in value]


def _to_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


def optimizer_state(strategy: object) -> dict[str, Any]:
    """The buffers and scalars of :data:`BUFFERS` / :data:`SCALARS` that ``strategy`` holds
    (empty for a strategy without any, or before its first aggregation)."""
    state: dict[str, Any] = {name: _to_tensors(getattr(strategy, name)) for name in BUFFERS
                             if getattr(strategy, name, None) is not None}
    state |= {name: float(getattr(strategy, name)) for name in SCALARS
              if getattr(strategy, name, None) is not None}
    return state


def load_optimizer_state(strategy: object, state: dict[str, Any]) -> None:
    """Restore :func:`optimizer_state` output into the same kind of strategy."""
    for name, value in state.items():
        if name not in BUFFERS + SCALARS or not hasattr(strategy, name):
            raise ValueError(f"{type(strategy).__name__}: checkpoint holds {name!r}, which this "
                             "strategy does not keep (resumed with a different strategy?)")
        setattr(strategy, name, float(value) if name in SCALARS else _to_arrays(value))
