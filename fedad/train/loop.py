"""The local optimisation loop of every trainer (MSVT, MAE, D-ADDA's detector and diffusion
models, the flow head) and the data loader of the image-level trainers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedad.data import AnomalyDataset, Sample
from fedad.device import autocast
from fedad.task import ExtraLoss

Batch = TypeVar("Batch")

Step = Callable[[Batch], tuple[Any, torch.Tensor | None, dict[str, torch.Tensor]]]
"""batch -> (model output, labels [B], losses): scalar tensors with the total under ``loss``;
output and labels are what ``extra_loss`` is called with."""

AfterStep = Callable[[int, dict[str, torch.Tensor]], None]
"""(steps so far in the epoch, 1-based; the step's losses) -> None, after each optimizer step."""


def make_loader(
    samples: Sequence[Sample],
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    defect_types: Sequence[str] | None = None,
) -> DataLoader:
    """A single-process loader over ``samples`` (decoded images cached in memory): batches of
    ``image`` [B, 3, H, W], ``mask`` [B, 1, H, W], ``label`` [B], ``defect_class`` [B]."""
    dataset = AnomalyDataset(samples, image_size, defect_types=defect_types)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_loop(step: Step, epochs: Iterable[Iterable[Batch]], optimizer: torch.optim.Optimizer,
               params: Sequence[nn.Parameter], *, max_batches: int = 0,
               extra_loss: ExtraLoss | None = None,
               lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
               after_step: AfterStep | None = None, clip_norm: float | None = 1.0,
               precision: str = "32", name: str = "train") -> dict[str, float]:
    """For each epoch (an iterable of batches, iterated once), for each batch: ``step``'s loss
    (+ ``extra_loss(output, labels)``), a check that it is finite, backward, gradient clipping
    of ``params`` at ``clip_norm``, optimizer step, then ``lr_schedule.step()`` and
    ``after_step``. ``step`` moves its batch to the model's device
    (:func:`fedad.device.to_device`).

    Args:
        max_batches: stop each epoch after this many batches (0: no limit), for tiny CI runs.
        clip_norm: gradient-norm bound (None: no clipping).
        precision: ``step`` and ``extra_loss`` run under :func:`fedad.device.autocast` on the
            device of ``params``; ``16-mixed`` scales the loss (torch's GradScaler) and skips
            a step whose gradients overflow.
        name: named in the FloatingPointError raised on a non-finite loss.
    Returns:
        the last epoch's mean of every loss term, as ``train_<term>``.
    """
    device = params[0].device if params else torch.device("cpu")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    totals: dict[str, float] = {}
    steps = 0
    for batches in epochs:
        totals, steps = {}, 0
        for batch in batches:
            with autocast(device, precision):
                output, labels, losses = step(batch)
                if extra_loss is not None:
                    losses["extra_loss"] = extra_loss(output, labels)
                    losses["loss"] = losses["loss"] + losses["extra_loss"]
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"{name}: non-finite loss {losses['loss'].item()} at "
                                         f"step {steps + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if clip_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if lr_schedule is not None:
                lr_schedule.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
            if after_step is not None:
                after_step(steps, losses)
            if max_batches and steps >= max_batches:
                break
    return {f"train_{k}": v / max(steps, 1) for k, v in totals.items()}
