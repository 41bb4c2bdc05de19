"""Texture renderers for the synthetic data: skimage photo crops and procedural materials.

Every renderer maps (rng, size) to a float32 [size, size, 3] image in [0, 1]; every call
differs (crop, pose, flips, brightness, contrast and colour tint are drawn from ``rng``).
"""

from __future__ import annotations

import functools

import numpy as np
import skimage.data
from scipy.ndimage import affine_transform

from fedad.data.raster import pixel_grid, smooth_noise


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A grey skimage sample image (loads offline) as float32 [H, W] in [0, 1]."""
    return getattr(skimage.data, name)().astype(np.float32) / 255


def tint(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 [S, S, 3]: ``rgb`` [S, S, 3] with random brightness and per-channel colour gain."""
    gain = rng.uniform(0.9, 1.1) * (1 + rng.normal(0.0, 0.05, 3))
    return np.clip(rgb * gain, 0.0, 1.0).astype(np.float32)


def colorize(
    gray: np.ndarray, rng: np.random.Generator, base: tuple[float, float, float]
) -> np.ndarray:
    """Float32 [S, S, 3]: ``gray`` [S, S] with contrast jitter, coloured ``base`` RGB, tinted."""
    mean = gray.mean()
    gray = (gray - mean) * rng.uniform(0.8, 1.2) + mean
    return tint(gray[..., None] * np.asarray(base, np.float32), rng)


def random_orientation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` rotated by a random multiple of 90 degrees and randomly flipped."""
    image = np.rot90(image, int(rng.integers(4)))
    return np.ascontiguousarray(image[:, ::-1] if rng.random() < 0.5 else image)


def photo_crop(name: str, rng: np.random.Generator, size: int, zoom: tuple[float, float]):
    """Float32 [size, size]: a random rotated, scaled (source pixels per output pixel drawn
    from ``zoom`` at size 128, proportionally less at larger sizes), flipped crop of the
    skimage image ``name``."""
    src = _photo(name)
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(*zoom) * 128 / size
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    reach = size * scale * 0.75
    center = rng.uniform(reach, np.array(src.shape) - reach)
    offset = center - matrix @ np.full(2, size / 2)
    crop = affine_transform(src, matrix, offset, output_shape=(size, size), order=1, mode="mirror")
    return random_orientation(crop, rng)


def brick(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 [size, size, 3] red-brown brick wall (skimage ``brick``)."""
    return colorize(photo_crop("brick", rng, size, (1.1, 1.6)), rng, (1.05, 0.72, 0.58))


def fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 [size, size, 3] plain-weave cloth: warp and weft threads alternating over and
    under, per-thread shade variation, fibre noise along each thread."""
    rows, cols = pixel_grid(size)
    period = rng.uniform(5.0, 6.5) * size / 128
    angle = np.deg2rad(rng.uniform(-6, 6))
    u = cols * np.cos(angle) + rows * np.sin(angle) + rng.uniform(0, period)
    v = -cols * np.sin(angle) + rows * np.cos(angle) + rng.uniform(0, period)
    iu, iv = np.floor(u / period).astype(int), np.floor(v / period).astype(int)
    warp_on_top = (iu + iv) % 2 == 0
    across = np.where(warp_on_top, u, v) / period % 1.0
    profile = np.sin(np.pi * across) ** 0.6
    shades = 1 + 0.08 * rng.standard_normal(size + 8)
    thread_shade = np.where(warp_on_top, shades[iu % size], shades[iv % size])
    along_u, along_v = smooth_noise(rng, size, (4, 0.6)), smooth_noise(rng, size, (0.6, 4))
    fibres = np.where(warp_on_top, along_u, along_v)
    gray = (0.35 + 0.45 * profile) * thread_shade + 0.05 * fibres
    palette = [(0.45, 0.55, 0.85), (0.95, 0.85, 0.62), (0.8, 0.8, 0.8)]
    return colorize(gray, rng, palette[int(rng.integers(len(palette)))])


def wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 [size, size, 3] planed wood: growth rings around a far-off, noise-warped centre,
    fine grain streaks along the board."""
    rows, cols = pixel_grid(size)
    center_row = rng.uniform(-3, -1.5) * size
    center_col = rng.uniform(0.2, 0.8) * size
    radius = np.hypot((rows - center_row) * 0.25, cols - center_col)
    radius = radius + 3.0 * smooth_noise(rng, size, 10) + 0.6 * smooth_noise(rng, size, (6, 1))
    rings = np.sin(np.pi * (radius / (rng.uniform(6, 10) * size / 128) % 1.0)) ** 4
    grain = smooth_noise(rng, size, (8, 0.5))
    dark = np.clip(0.55 * rings + 0.12 * grain + 0.25, 0, 1)[..., None]
    light, deep = np.array([0.86, 0.66, 0.42]), np.array([0.5, 0.3, 0.16])
    return random_orientation(tint(light * (1 - dark) + deep * dark, rng), rng)
