"""GPU check: the same seeded runs on a CUDA device and on the CPU must agree, and the table
says how much faster the device is.

Three parts, each run on ``--device`` (default ``cuda``) and on the CPU with the same seeds:

- MSVT at ``--image-size`` (224 px): a one-round in-process federation of ``--sites`` sites,
  ``--msvt-batches`` training batches each, then the server's evaluation on the test split;
- the memory bank (method ``memorybank``, its defaults: Lite0 features, Sinkhorn K-means into
  300 prototypes, whitening) at the same size, one round;
- a reduced paper-scale D-ADDA diffusion model (G^I at 128 px, 1000 diffusion steps, the
  paper's U-Net at ``--unet-channels``): ``--compare-iterations`` training steps and a short
  DDIM sampling on both devices, then ``--dadda-iterations`` steps (a few thousand) and
  ``--samples`` images with ``--sample-steps`` DDIM steps on the device only (the CPU's time
  for them is extrapolated from its per-step time).

Agreement: image / pixel AUROC and AUPRO within ``--tolerance`` (absolute), training and
held-out denoising losses within ``--loss-tolerance`` (relative); floating-point order differs
between devices, so agreement is not bit-for-bit. Exit status 1 when a check fails; one line and
status 0 on a machine without CUDA. About 6 minutes on one H200 with the defaults (16 CPU
cores); ``--device cpu`` compares the CPU with itself (a smoke test of this script):

    python bench/gpu_check.py
    python bench/gpu_check.py --device cpu --image-size 64 --msvt-batches 1 --train-images 4 \\
        --compare-iterations 2 --dadda-iterations 2 --samples 1 --sample-steps 2 --unet-channels 8
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from fedad.config import ExperimentConfig
from fedad.dadda.diffusion import noise_scheduler, sample, train_diffusion
from fedad.dadda.settings import DADDASettings
from fedad.dadda.synthesis import to_model_range
from fedad.data import generate_dataset, load_image
from fedad.device import resolve_device
from fedad.inprocess import run_in_process
from fedad.models.diffusion_unet import DiffusionUNet

CATEGORY = "washer"
METHODS = {
    "msvt": {"method": "msvt"},
    "memorybank": {"method": "memorybank"},
}
COMPARED = ("image_auroc", "pixel_auroc", "aupro")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The budget and tolerance arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU")
    parser.add_argument("--precision", default="32", help="autocast of the device's runs")
    parser.add_argument("--parts", default="msvt,memorybank,dadda")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=24, help="normal training images")
    parser.add_argument("--msvt-batches", type=int, default=4, help="batches of 8 per site")
    parser.add_argument("--unet-channels", type=int, default=64, help="paper config: 128")
    parser.add_argument("--compare-iterations", type=int, default=8)
    parser.add_argument("--dadda-iterations", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--loss-tolerance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed(function, device: torch.device):
    """(function(), wall seconds), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def federated_run(method: str, device: torch.device, args: argparse.Namespace, data: Path,
                  out: Path) -> tuple[dict[str, float], float]:
    """(final server metrics, seconds) of a one-round in-process run of ``method``."""
    precision = args.precision if device.type != "cpu" else "32"
    cfg = ExperimentConfig.from_run_config({
        **METHODS[method], "image-size": args.image_size, "num-server-rounds": 1,
        "local-epochs": 1, "max-train-batches": args.msvt_batches, "batch-size": 8,
        "val-fraction": 0.0, "plot-every-round": False, "seed": args.seed,
        "device": str(device), "precision": precision, "data-path": str(data),
        "category": CATEGORY, "results-dir": str(out / f"{method}-{device.type}")})
    summary, seconds = timed(lambda: run_in_process(cfg, args.sites), device)
    return summary["final"], seconds


def dadda_settings(args: argparse.Namespace, sample_steps: int) -> DADDASettings:
    """The reduced paper scale: 128 px, 1000 steps, 4 U-Net levels, batch 16, lr 1e-4."""
    return DADDASettings(dadda_diffusion_size=128, dadda_unet_channels=args.unet_channels,
                         dadda_unet_levels=4, dadda_diffusion_steps=1000,
                         dadda_diffusion_batch=16, dadda_diffusion_lr=1e-4, dadda_warmup=100,
                         dadda_sample_steps=sample_steps)


def held_out_loss(model: DiffusionUNet, data: torch.Tensor, settings: DADDASettings,
                  seed: int) -> float:
    """The noise-prediction MSE of ``model`` on ``data`` [N, 3, S, S] with seeded noise and
    timesteps (drawn on the CPU, the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(data.shape, generator=generator)
    t = torch.randint(settings.dadda_diffusion_steps, (len(data),), generator=generator)
    noisy = noise_scheduler(settings).add_noise(data, noise, t)
    device = next(model.parameters()).device
    with torch.no_grad():
        predicted = model(noisy.to(device), t.to(device)).float().cpu()
    return float(F.mse_loss(predicted, noise))


def diffusion_run(device: torch.device, data: torch.Tensor, args: argparse.Namespace,
                  iterations: int, samples: int, sample_steps: int) -> dict:
    """G^I trained ``iterations`` steps from a seeded initialisation and ``samples`` images
    drawn: losses, samples [n, 3, S, S] (CPU) and seconds of each phase."""
    precision = args.precision if device.type != "cpu" else "32"
    settings = dadda_settings(args, sample_steps)
    torch.manual_seed(args.seed)
    model = DiffusionUNet(**settings.unet_kwargs(3)).to(device)
    (ema, stats), train_seconds = timed(lambda: train_diffusion(
        model, data, settings=settings, iterations=iterations, seed=args.seed,
        name=f"G^I ({device.type})", precision=precision), device)
    drawn, sample_seconds = timed(lambda: sample(ema, samples, settings=settings, seed=args.seed,
                                                 batch_size=16, precision=precision), device)
    return {"loss": stats["loss"], "held_out": held_out_loss(ema, data[:16], settings, 1),
            "samples": drawn, "train_s_per_it": train_seconds / iterations,
            "sample_s_per_image_step": sample_seconds / (samples * sample_steps),
            "train_seconds": train_seconds, "sample_seconds": sample_seconds}


def check(rows: list[dict], part: str, metric: str, cpu: float, other: float,
          tolerance: float, relative: bool = False) -> None:
    """Append an agreement row: |cpu - other| (relative to |cpu| if ``relative``) within
    ``tolerance``; NaN on both sides agrees."""
    gap = abs(cpu - other) / max(abs(cpu), 1e-12) if relative else abs(cpu - other)
    agrees = (math.isnan(cpu) and math.isnan(other)) or gap <= tolerance
    rows.append({"part": part, "metric": metric, "cpu": cpu, "device": other, "gap": gap,
                 "tolerance": f"{tolerance:g}" + (" rel" if relative else ""),
                 "agrees": bool(agrees)})


def main(argv: list[str] | None = None) -> int:
    """Run the parts; print the agreement and speed tables; 1 when a check fails."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "nothing checked")
        return 0
    logging.basicConfig(level=logging.WARNING)
    device, cpu = resolve_device(args.device), torch.device("cpu")
    parts = set(args.parts.split(","))
    timed(lambda: torch.zeros(1, device=device).sum(), device)  # CUDA context outside timings
    agreement, speed = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp)
        data = generate_dataset(out / "mvtec", seed=args.seed, image_size=args.image_size,
                                num_train=args.train_images, num_test_good=6,
                                num_test_per_defect=3, categories=[CATEGORY])
        for method in (m for m in METHODS if m in parts):
            (on_cpu, cpu_s), (on_dev, dev_s) = (federated_run(method, d, args, data, out)
                                                for d in (cpu, device))
            for metric in COMPARED:
                check(agreement, method, metric, on_cpu[metric], on_dev[metric], args.tolerance)
            if "train_loss" in on_cpu:
                check(agreement, method, "train_loss", on_cpu["train_loss"],
                      on_dev["train_loss"], args.loss_tolerance, relative=True)
            speed.append({"part": f"{method} {args.image_size} px, one federated round",
                          "cpu_s": cpu_s, "device_s": dev_s})
        if "dadda" in parts:
            normal = sorted((data / CATEGORY / "train" / "good").glob("*.png"))
            images = to_model_range(np.stack([load_image(p, 128) for p in normal]))
            short = {d: diffusion_run(d, images, args, args.compare_iterations, 2, 10)
                     for d in (cpu, device)}
            for metric in ("loss", "held_out"):
                check(agreement, "dadda G^I", metric, short[cpu][metric], short[device][metric],
                      args.loss_tolerance, relative=True)
            for statistic in ("mean", "std"):
                check(agreement, "dadda G^I", f"samples {statistic}",
                      float(getattr(short[cpu]["samples"], statistic)()),
                      float(getattr(short[device]["samples"], statistic)()), args.tolerance)
            gap = (short[cpu]["samples"] - short[device]["samples"]).abs().mean()
            print(f"dadda G^I: 2 samples from the same noise differ by {float(gap):.4f} per "
                  "value between the devices (range [-1, 1])")
            full = diffusion_run(device, images, args, args.dadda_iterations, args.samples,
                                 args.sample_steps)
            cpu_it, cpu_step = (short[cpu]["train_s_per_it"],
                                short[cpu]["sample_s_per_image_step"])
            speed += [
                {"part": f"dadda G^I 128 px: {args.dadda_iterations} training iterations "
                         "(cpu extrapolated)", "cpu_s": cpu_it * args.dadda_iterations,
                 "device_s": full["train_seconds"]},
                {"part": f"dadda G^I: {args.samples} DDIM samples x {args.sample_steps} steps "
                         "(cpu extrapolated)",
                 "cpu_s": cpu_step * args.samples * args.sample_steps,
                 "device_s": full["sample_seconds"]}]
            print(f"dadda paper-scale run on {device}: loss {full['loss']:.4f}, held-out "
                  f"{full['held_out']:.4f}, samples finite: "
                  f"{bool(torch.isfinite(full['samples']).all())}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {name} vs {platform.processor() or 'cpu'} "
          f"({torch.get_num_threads()} torch threads), precision {args.precision}, "
          f"seed {args.seed}\n")
    table = pd.DataFrame(agreement)
    print(table.to_markdown(index=False, floatfmt=".4f") if len(table) else "no checks")
    if speed:
        times = pd.DataFrame(speed)
        times["speed_up"] = times["cpu_s"] / times["device_s"]
        print("\n" + times.to_markdown(index=False, floatfmt=".2f"))
    failed = [f"{r['part']} {r['metric']}" for r in agreement if not r["agrees"]]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks agree'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
