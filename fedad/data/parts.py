"""Procedurally drawn industrial parts (washer, hex nut, gear) on a textured mat.

A part is a signed distance field in part-local coordinates (negative inside, in pixels at
scale 1); :func:`render_part` poses it (rotation, translation, scale), shades it like machined
metal lit from one side and drops its shadow on the background.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, shift

from fedad.data.raster import pixel_grid, smooth_noise
from fedad.data.scene import Scene
from fedad.data.textures import tint

# (u, v, r, phi, size) -> signed distance [S, S] in pixels, negative inside the part
Shape = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def washer(u: np.ndarray, v: np.ndarray, r: np.ndarray, phi: np.ndarray, size: int) -> np.ndarray:
    """Signed distance of a flat ring (outer radius 0.36 S, inner 0.16 S)."""
    return np.maximum(r - 0.36 * size, 0.16 * size - r)


def hex_nut(u: np.ndarray, v: np.ndarray, r: np.ndarray, phi: np.ndarray, size: int) -> np.ndarray:
    """Signed distance of a hexagon (apothem 0.32 S) with a round bore (radius 0.14 S)."""
    normals = np.arange(6) * np.pi / 3
    faces = np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0)
    return np.maximum(faces - 0.32 * size, 0.14 * size - r)


def gear(u: np.ndarray, v: np.ndarray, r: np.ndarray, phi: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (radial approximation) of a 12-tooth spur gear with a bore and four
    lightening holes."""
    tooth = np.clip(1.6 * np.cos(12 * phi) + 0.4, -1, 1) * 0.5 + 0.5
    outer = r - (0.30 + 0.07 * tooth) * size
    dist = np.maximum(outer, 0.08 * size - r)
    for angle in np.arange(4) * np.pi / 2 + np.pi / 4:
        hole = np.hypot(u - 0.19 * size * np.cos(angle), v - 0.19 * size * np.sin(angle))
        dist = np.maximum(dist, 0.045 * size - hole)
    return dist


@dataclass(frozen=True)
class PartStyle:
    """Geometry and finish of one part category."""

    shape: Shape
    color: tuple[float, float, float]
    machining: str  # "turned" (concentric marks) or "brushed" (straight marks)


def mat_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 [size, size, 3] dark rubber conveyor mat: mottled noise with faint ribs."""
    rows, _ = pixel_grid(size)
    ribs = 0.03 * np.sin(2 * np.pi * rows / rng.uniform(7, 10) + rng.uniform(0, 2 * np.pi))
    gray = 0.3 + 0.04 * smooth_noise(rng, size, 3) + 0.02 * smooth_noise(rng, size, 0.7) + ribs
    return tint(gray[..., None] * np.array([0.85, 0.95, 0.9]), rng)


def render_part(style: PartStyle, rng: np.random.Generator, size: int) -> Scene:
    """A posed, shaded part with its coverage and shadow on a random mat background."""
    rows, cols = pixel_grid(size)
    center = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    scale = rng.uniform(0.9, 1.1)
    turn = rng.uniform(0, 2 * np.pi)
    dy, dx = (rows - center[0]) / scale, (cols - center[1]) / scale
    u = dx * np.cos(turn) + dy * np.sin(turn)
    v = -dx * np.sin(turn) + dy * np.cos(turn)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    dist = style.shape(u, v, r, phi, size) * scale
    alpha = np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)

    light = rng.uniform(0, 2 * np.pi)
    image_phi = np.arctan2(rows - center[0], cols - center[1])
    facing = np.cos(image_phi - light)  # +1 on the side of the part that faces the light
    bevel = np.clip(1 + dist / 3, 0, 1) * 0.18 * facing
    sheen = 0.12 * np.cos(2 * (image_phi - light)) * np.clip(r / (0.36 * size), 0, 1)
    marks_axis = r if style.machining == "turned" else u
    marks = 0.03 * np.sin(marks_axis * rng.uniform(2.5, 3.5)) + 0.02 * smooth_noise(rng, size, 0.8)
    gray = 0.78 + bevel + sheen + marks
    part = tint(gray[..., None] * np.asarray(style.color, np.float32), rng)

    offset = 2.5 * np.array([-np.sin(light), -np.cos(light)])
    shadow = gaussian_filter(shift(alpha, offset, order=1), 2.0)
    background = mat_background(rng, size) * (1 - 0.45 * shadow[..., None])
    return Scene(background.astype(np.float32), part, alpha)


PART_STYLES: dict[str, PartStyle] = {
    "washer": PartStyle(washer, (0.78, 0.8, 0.84), "turned"),
    "hex_nut": PartStyle(hex_nut, (0.74, 0.76, 0.8), "brushed"),
    "gear": PartStyle(gear, (0.9, 0.76, 0.45), "turned"),
}
