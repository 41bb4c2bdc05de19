"""Per-image inference latency of every registered detector, on one CPU core.

Every method of fedad.methods.METHODS is timed (the registry is read at run time, so methods
added later are measured too), at each image size, end to end on one test image, on the CPU
(``device=cpu``) with torch.set_num_threads(1):

- a method with a model recipe (msvt, mae, D-ADDA's detector): the model built at its default
  config, through the recipe's own ``predict``: image loading and resizing, the forward pass and
  the method's post-processing (e.g. map smoothing);
- a feature head (memorybank, gmm, flow, padim): the head fitted at its defaults on the patch
  features of ``--fit-images`` normal training images (with the whitening of their moments, as
  the federated run agrees it), then loading, feature extraction, whitening, patch scoring,
  upsampling, smoothing and the image score of the test image.

Median and p90 of ``--repeats`` after ``--warmup`` runs, wall clock and process CPU time (the
latter is less sensitive to other jobs on a shared machine).

    python bench/perf_latency.py --sizes 224 --repeats 30
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.experiment import ExperimentData, prepare_data
from fedad.heads.registry import HEADS, extractor_for, head_for, head_settings
from fedad.heads.scoring import anomaly_maps, extract_patches, image_scores
from fedad.heads.whitening import Whitening, feature_moments, whiten
from fedad.methods import METHODS
from fedad.task import build_model, model_recipe

Predict = Callable[[Sequence[Sample]], np.ndarray]
"""samples -> anomaly maps [N, S, S]."""


def recipe_predictor(cfg: ExperimentConfig, data: ExperimentData) -> tuple[Predict, float]:
    """The recipe's ``predict`` of its freshly built model, and the model's parameters (M)."""
    recipe = model_recipe(cfg)
    model = build_model(cfg).eval()

    def predict(samples: Sequence[Sample]) -> np.ndarray:
        return recipe.predict(model, samples, cfg, data.defect_types).maps

    return predict, sum(p.numel() for p in model.parameters()) / 1e6


def head_predictor(cfg: ExperimentConfig, data: ExperimentData, fit_images: int
                   ) -> tuple[Predict, float]:
    """A head fitted on ``fit_images`` normal training images (whitened by their moments) and
    the scoring of a test set under it; the extractor's parameters (M)."""
    settings = head_settings(cfg)
    extractor, head = extractor_for(cfg), head_for(cfg)
    normal = [s for s in data.samples(0, "train") if s.label == 0][:fit_images]
    patches = extract_patches(extractor, normal, cfg.image_size)
    whitening = (Whitening.from_moments([feature_moments(patches.flat(settings.max_patches))])
                 if settings.feature_whitening else None)
    payload = head.fit_local(whiten(head.fit_rows(patches, seed=cfg.seed), whitening))
    sigma = settings.sigma(cfg.method, cfg.image_size)

    def predict(samples: Sequence[Sample]) -> np.ndarray:
        test = extract_patches(extractor, samples, cfg.image_size, data.defect_types)
        maps = anomaly_maps(head, payload, test.features, cfg.image_size, sigma,
                            whitening=whitening)
        image_scores(maps, settings)
        return maps

    return predict, sum(p.numel() for p in extractor.parameters()) / 1e6



def latency(method: str, image_size: int, repeats: int, warmup: int, fit_images: int) -> dict:
    """Median and p90 seconds of one test image through ``method`` at ``image_size``."""
    cfg = ExperimentConfig(method=method, image_size=image_size, device="cpu")
    data = prepare_data(cfg, 1)
    sample = data.samples(-1, "test")[:1]
    predict, params = (head_predictor(cfg, data, fit_images) if method in HEADS
                       else recipe_predictor(cfg, data))
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            maps = predict(sample)
            if i >= warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    assert maps.shape[-2:] == (image_size, image_size), maps.shape
    return {"method": method, "image_size": image_size, "params_M": params,
            "median_ms": 1000 * statistics.median(wall),
            "p90_ms": 1000 * float(np.percentile(wall, 90)),
            "median_cpu_ms": 1000 * statistics.median(cpu)}


def main() -> None:
    """Time every method (or ``--methods``) at every size; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fit-images", type=int, default=8,
                        help="normal images a feature head is fitted on")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    for method in args.methods.split(","):
        for size in map(int, args.sizes.split(",")):
            rows.append(latency(method, size, args.repeats, args.warmup, args.fit_images))
            print(f"{method} {size}px: {rows[-1]['median_ms']:.1f} ms", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f}, 1 thread, median of {args.repeats} after {args.warmup} "
          f"warm-up runs, default config of each method (heads fitted on {args.fit_images} "
          "normal images)\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
