"""New defect masks from superpixels (Algorithm 1, REPLACESUPERPIXELS and AUGMENTMASK)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fedad.dam.superpixels import SuperpixelMap


def defective_superpixels(superpixels: SuperpixelMap, mask: np.ndarray, rings: int) -> np.ndarray:
    """bool [K]: superpixels overlapping the defect ``mask`` [H, W], grown by ``rings`` rings
    of adjacent superpixels. ValueError when ``mask`` is empty."""
    hit = superpixels.overlapping(mask)
    if not hit.any():
        raise ValueError("defect mask is empty: no defective superpixel")
    return superpixels.grow(hit, rings)


def select_nearest(
    superpixels: SuperpixelMap, candidates: np.ndarray, fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """bool [K]: a random target among ``candidates`` (bool [K]) and its nearest candidates by
    centroid distance, ``max(1, round(fraction * n))`` superpixels of the n candidates in all."""
    pool = np.flatnonzero(candidates)
    if pool.size == 0:
        raise ValueError("no candidate superpixels")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be in (0, 1]")
    target = pool[rng.integers(pool.size)]
    distance = np.linalg.norm(superpixels.centroids[pool] - superpixels.centroids[target], axis=1)
    keep = max(1, round(fraction * pool.size))
    chosen = pool[np.argsort(distance, kind="stable")[:keep]]
    selected = np.zeros(superpixels.count, dtype=bool)
    selected[chosen] = True
    return selected


def smooth_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """bool [H, W]: ``mask`` blurred with a Gaussian of ``sigma`` px and thresholded at 0.5,
    which rounds superpixel corners and removes one-pixel spurs; ``mask`` itself when
    smoothing would leave nothing."""
    if sigma <= 0:
        return mask.astype(bool)
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma) > 0.5
    return smooth if smooth.any() else mask.astype(bool)
