"""The local optimisation loop shared by the trainers (supervised MSVT, MAE)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fedad.task import ExtraLoss

# batch -> (model output, labels [B], losses: scalar tensors with the total under "loss")
Step = Callable[[dict[str, torch.Tensor]], tuple[Any, torch.Tensor, dict[str, torch.Tensor]]]


def train_epochs(step: Step, loader: Iterable[dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], *,
                 epochs: int, max_batches: int = 0, extra_loss: ExtraLoss | None = None,
                 name: str = "train") -> dict[str, float]:
    """``epochs`` passes over ``loader``: loss (+ ``extra_loss(output, labels)``), backward,
    gradient clipping at norm 1, optimizer step.

    Args:
        max_batches: stop each epoch after this many batches (0: no limit), for tiny CI runs.
        name: named in the FloatingPointError raised on a non-finite loss.
    Returns:
        the last epoch's mean of every loss term, as ``train_<term>``.
    """
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        totals, steps = {}, 0
        for batch in loader:
            output, labels, losses = step(batch)
            if extra_loss is not None:
                losses["extra_loss"] = extra_loss(output, labels)
                losses["loss"] = losses["loss"] + losses["extra_loss"]
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"{name}: non-finite loss {losses['loss'].item()}")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
            if max_batches and steps >= max_batches:
                break
    return {f"train_{k}": v / max(steps, 1) for k, v in totals.items()}
