"""D-ADDA's diffusion models on CPU: training steps/s and sampling images/s of G^I
(unconditional), G^M (class-conditional, classifier-free guidance) and the mask-conditioned
G^I of stage 3, at the CPU default and at the paper's scale (configs/dadda_paper.yaml).

Random data in the models' range: speed does not depend on the content. Medians of
``--repeats`` timings; one torch thread unless OMP_NUM_THREADS says otherwise.

    OMP_NUM_THREADS=1 python bench/diffusion.py --iterations 5 --images 4 --repeats 3  # BENCHMARKS
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace

import pandas as pd
import torch

from fedad.dadda.diffusion import sample, train_diffusion
from fedad.dadda.settings import DADDASettings
from fedad.models.diffusion_unet import DiffusionUNet

SCALES = {
    "cpu default": DADDASettings(),
    "paper (128 px)": DADDASettings(dadda_diffusion_size=128, dadda_unet_channels=64,
                                    dadda_unet_levels=4, dadda_diffusion_steps=1000,
                                    dadda_diffusion_batch=16, dadda_sample_steps=50),
}
NUM_CLASSES = 4


def _models(settings: DADDASettings) -> dict[str, tuple[DiffusionUNet, dict]]:
    """name -> (model, conditioning inputs factory kwargs) of the three diffusion models."""
    return {
        "G^I": (DiffusionUNet(**settings.unet_kwargs(3)), {}),
        "G^M": (DiffusionUNet(**settings.unet_kwargs(1, num_classes=NUM_CLASSES)),
                {"classes": True}),
        "G^I + mask": (DiffusionUNet(**settings.unet_kwargs(3, mask_conditioning=True)),
                       {"masks": True}),
    }


def _inputs(model: DiffusionUNet, count: int, wants: dict) -> dict[str, torch.Tensor]:
    size = model.image_size
    extra = {}
    if wants.get("classes"):
        extra["classes"] = torch.arange(count) % NUM_CLASSES
    if wants.get("masks"):
        extra["masks"] = (torch.rand(count, 1, size, size) > 0.9).float()
    return extra


def measure(scale: str, settings: DADDASettings, iterations: int, images: int,
            repeats: int, ddpm: bool) -> list[dict]:
    """Rows of steps/s and images/s for each model at ``settings`` (ancestral DDPM sampling,
    one image through all T steps, only when ``ddpm``)."""
    rows = []
    for name, (model, wants) in _models(settings).items():
        size = model.image_size
        data = torch.rand(32, model.in_channels, size, size) * 2 - 1
        conditioning = _inputs(model, len(data), wants)
        train_times = []
        for repeat in range(repeats):
            start = time.perf_counter()
            train_diffusion(model, data, settings=settings, iterations=iterations, seed=repeat,
                            **conditioning)
            train_times.append(time.perf_counter() - start)
        row = {"scale": scale, "model": name, "side": size,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
               "train_steps_per_s": iterations / statistics.median(train_times),
               "batch": settings.dadda_diffusion_batch}
        samplers = [("ddim", settings.dadda_sample_steps)]
        samplers += [("ddpm", settings.dadda_diffusion_steps)] if ddpm else []
        for sampler, steps in samplers:
            run = replace(settings, dadda_sampler=sampler)
            count = images if sampler == "ddim" else 1
            times = []
            for repeat in range(repeats if sampler == "ddim" else 1):
                start = time.perf_counter()
                sample(model, count, settings=run, seed=repeat, batch_size=count,
                       **_inputs(model, count, wants))
                times.append(time.perf_counter() - start)
            row[f"{sampler}_{steps}_images_per_s"] = count / statistics.median(times)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default=",".join(SCALES))
    parser.add_argument("--iterations", type=int, default=10, help="training steps per timing")
    parser.add_argument("--images", type=int, default=8, help="images per DDIM sampling batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ddpm-scales", default="cpu default",
                        help="scales at which ancestral sampling over all T steps is timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rows = []
    for scale in args.scales.split(","):
        rows += measure(scale, SCALES[scale], args.iterations, args.images, args.repeats,
                        scale in args.ddpm_scales.split(","))
    table = pd.DataFrame(rows)
    print(f"\ntorch threads: {torch.get_num_threads()}\n")
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
