"""Training and sampling of D-ADDA's diffusion models (DDPM training; DDIM or ancestral DDPM
sampling) with diffusers' noise schedulers, EMA weights and a linear learning-rate warm-up.

Tensors here are in the models' range [-1, 1]: images [N, 3, S, S], masks [N, 1, S, S]. They
are given and returned on the CPU; the models compute on their own device, and every random
draw (batches, noise, timesteps, class dropout) comes from a seeded CPU generator, so a run
draws the same numbers on every device.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel

from fedad.dadda.settings import DADDASettings
from fedad.device import autocast, model_device, to_device
from fedad.models.diffusion_unet import DiffusionUNet
from fedad.train.loop import train_loop

log = logging.getLogger(__name__)

BETA_SCHEDULE = "squaredcos_cap_v2"
"""Cosine schedule (Nichol & Dhariwal): sensible for any number of steps T, unlike the linear
schedule tuned for T = 1000 (the paper does not name its schedule)."""


def noise_scheduler(settings: DADDASettings,
                    sampler: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """A diffusers scheduler over ``dadda-diffusion-steps`` with timesteps set for sampling
    (all T for ``ddpm``, ``dadda-sample-steps`` for ``ddim``)."""
    kwargs = {"num_train_timesteps": settings.dadda_diffusion_steps,
              "beta_schedule": BETA_SCHEDULE, "clip_sample": True}
    if sampler == "ddim":
        scheduler = DDIMScheduler(**kwargs)
        scheduler.set_timesteps(settings.dadda_sample_steps)
    else:
        scheduler = DDPMScheduler(**kwargs)
        scheduler.set_timesteps(settings.dadda_diffusion_steps)
    return scheduler


def ema_update(decay: float):
    """An :class:`AveragedModel` ``avg_fn``: EMA with decay min(decay, (1 + n) / (10 + n)) after
    n updates (the warm-up of diffusers' EMAModel), so that a short run's EMA is not dominated
    by the random initial weights (0.995^300 = 0.22 of them otherwise)."""

    def update(averaged: torch.Tensor, current: torch.Tensor,
               num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        rate = min(decay, (1.0 + n) / (10.0 + n))
        return rate * averaged + (1.0 - rate) * current

    return update


def _check_range(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all() or tensor.min() < -1.0001 or tensor.max() > 1.0001:
        raise ValueError(f"{name}: expected finite values in [-1, 1]")


def train_diffusion(
    model: DiffusionUNet,
    data: torch.Tensor,
    *,
    settings: DADDASettings,
    iterations: int,
    seed: int,
    classes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    name: str = "diffusion",
    precision: str = "32",
) -> tuple[DiffusionUNet, dict[str, float]]:
    """Train ``model`` to predict the noise of ``data`` (DDPM, eq. of Ho et al.) and return its
    EMA copy (decay ``dadda-ema``, with warm-up, see :func:`ema_update`) and statistics.

    Args:
        data: [N, C, S, S] in [-1, 1] (C = model.in_channels).
        iterations: optimizer steps (batches of ``dadda-diffusion-batch`` drawn with replacement).
        classes: [N] int64 in [0, K) for a class-conditioned model; dropped to the null class K
            with probability ``dadda-class-dropout`` (classifier-free guidance).
        masks: [N, 1, S, S] {0,1} conditioning masks for a mask-conditioned model.
        precision: autocast of the training steps (:func:`fedad.device.autocast`).
    Returns:
        (EMA model in eval mode, on the model's device; {"loss": mean loss of the last 10 %
        iterations, "seconds"}).
    """
    _check_range(f"{name} data", data)
    if data.ndim != 4 or data.shape[1] != model.in_channels or len(data) == 0:
        raise ValueError(f"{name}: data {tuple(data.shape)} != [N>0, {model.in_channels}, S, S]")
    for extra_name, extra in (("classes", classes), ("masks", masks)):
        if extra is not None and len(extra) != len(data):
            raise ValueError(f"{name}: {len(extra)} {extra_name} for {len(data)} samples")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler(settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.dadda_diffusion_lr)
    warmup = max(settings.dadda_warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    ema = AveragedModel(model, avg_fn=ema_update(settings.dadda_ema), use_buffers=True)
    device = model_device(model)
    model.train()
    losses: list[float] = []

    def step(index: torch.Tensor):
        clean = data[index]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(settings.dadda_diffusion_steps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        kwargs = {}
        if classes is not None:
            drop = torch.rand(len(index), generator=generator) < settings.dadda_class_dropout
            kwargs["classes"] = torch.where(drop, model.num_classes, classes[index])
        if masks is not None:
            kwargs["mask"] = masks[index]
        noisy, t, noise, kwargs = to_device((noisy, t, noise, kwargs), device)
        return None, None, {"loss": F.mse_loss(model(noisy, t, **kwargs).float(), noise)}

    def after_step(done: int, step_losses: dict[str, torch.Tensor]) -> None:
        ema.update_parameters(model)
        losses.append(step_losses["loss"].item())
        if done % max(iterations // 5, 1) == 0:
            log.info("%s: iteration %d/%d loss %.4f", name, done, iterations, losses[-1])

    draws = (torch.randint(len(data), (settings.dadda_diffusion_batch,), generator=generator)
             for _ in range(iterations))  # drawn lazily, before each step's noise
    train_loop(step, [draws], optimizer, list(model.parameters()), lr_schedule=schedule,
               after_step=after_step, precision=precision, name=name)
    tail = losses[-max(len(losses) // 10, 1):] if losses else [float("nan")]
    averaged = copy.deepcopy(ema.module).eval()
    return averaged, {"loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


@torch.no_grad()
def sample(
    model: DiffusionUNet,
    count: int,
    *,
    settings: DADDASettings,
    seed: int,
    classes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    batch_size: int = 32,
    precision: str = "32",
) -> torch.Tensor:
    """Draw ``count`` samples [count, C, S, S] in [-1, 1] with the ``dadda-sampler``, on the
    model's device (the initial noise drawn on the CPU), returned on the CPU.

    Args:
        classes: [count] int64 in [0, K) for a class-conditioned model; sampled with
            classifier-free guidance eps = eps_null + w (eps_class - eps_null), w =
            ``dadda-guidance``.
        masks: [count, 1, S, S] {0,1} for a mask-conditioned model.
        precision: autocast of the model's calls (the sampler's update stays float32).
    """
    model.eval()
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for first in range(0, count, batch_size):
        part = slice(first, min(first + batch_size, count))
        n = part.stop - part.start
        scheduler = noise_scheduler(settings, settings.dadda_sampler)
        x = to_device(torch.randn((n, model.in_channels, model.image_size, model.image_size),
                                  generator=generator), device)
        condition = to_device(None if masks is None else masks[part], device)
        if classes is not None:
            null = torch.full((n,), model.num_classes, dtype=torch.long)
            both_classes = to_device(torch.cat([classes[part], null]), device)
        for t in scheduler.timesteps:
            steps = to_device(t.expand(n), device)
            with autocast(device, precision):
                if classes is not None:
                    both = model(torch.cat([x, x]), torch.cat([steps, steps]),
                                 classes=both_classes)
                    eps_class, eps_null = both.float().chunk(2)
                    eps = eps_null + settings.dadda_guidance * (eps_class - eps_null)
                else:
                    eps = model(x, steps, mask=condition).float()
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1.0, 1.0).cpu())
    result = torch.cat(out) if out else torch.empty(0, model.in_channels, model.image_size,
                                                    model.image_size)
    if not torch.isfinite(result).all():
        raise FloatingPointError("sample: non-finite samples")
    return result
