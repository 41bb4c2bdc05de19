"""Small raster helpers shared by the synthetic texture, part and defect renderers.

Coordinates are (row, col) in pixels; images are float32 in [0, 1].
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter
from skimage.draw import line


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel: two float32 [size, size] arrays."""
    coords = np.arange(size, dtype=np.float32)
    return np.meshgrid(coords, coords, indexing="ij")


def smooth_noise(
    rng: np.random.Generator, size: int, sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise, float32 [size, size], zero mean and unit std."""
    noise = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return ((noise - noise.mean()) / (noise.std() + 1e-8)).astype(np.float32)


def draw_polyline(points: np.ndarray, size: int, width: int = 1) -> np.ndarray:
    """Bool [size, size] mask of the polyline through ``points`` ([N, 2] float (row, col)).

    Lines are ``width`` pixels thick (dilation by a cross for width > 1); parts outside the
    image are clipped.
    """
    mask = np.zeros((size, size), dtype=bool)
    ends = np.round(points).astype(int)
    for (r0, c0), (r1, c1) in itertools.pairwise(ends):
        rows, cols = line(r0, c0, r1, c1)
        keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        mask[rows[keep], cols[keep]] = True
    if width > 1:
        mask = binary_dilation(mask, iterations=width - 1)
    return mask


def irregular_blob(
    rng: np.random.Generator,
    size: int,
    center: tuple[float, float],
    radius: float,
    irregularity: float,
) -> np.ndarray:
    """Bool [size, size] mask of an elliptical blob with a randomly wobbling boundary.

    The boundary radius is ``radius * (1 + irregularity * sum_k a_k cos(k*phi + p_k))`` for
    harmonics k = 2..5 on a random ellipse (aspect 0.6-1, random orientation).
    """
    rows, cols = pixel_grid(size)
    dy, dx = rows - center[0], cols - center[1]
    tilt = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
    phi = np.arctan2(v, u)
    wobble = sum(
        rng.uniform(-1, 1) / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in range(2, 6)
    )
    return np.hypot(u, v) < radius * (1 + irregularity * wobble)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (any shape) to uint8 by clipping and rounding."""
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
