"""Defect renderers: each draws one defect of its kind on a clean :class:`Scene`.

A defect is ``(scene, rng) -> float32 [S, S, 3]`` image (noise-free, like ``scene.compose()``)
and changes only the pixels of its region. Sizes scale with S; contrast and colour are drawn
from wide ranges (some defects are faint) so that no intensity threshold separates them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

from fedad.data.raster import draw_polyline, irregular_blob
from fedad.data.scene import Scene

Defect = Callable[[Scene, np.random.Generator], np.ndarray]


def _anchor(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random (row, col) point where ``support`` [S, S] is True, float [2]."""
    rows, cols = np.nonzero(support)
    pick = int(rng.integers(len(rows)))
    return np.array([rows[pick], cols[pick]], dtype=float)


def _shade(image: np.ndarray, region: np.ndarray, strength: float) -> np.ndarray:
    """``image`` [S, S, 3] with ``region`` [S, S] brightened (strength > 0) or darkened (< 0)
    by the fraction ``|strength|`` of the way to white or black."""
    out = image.copy()
    pixels = out[region]
    out[region] = pixels + strength * (1 - pixels) if strength > 0 else pixels * (1 + strength)
    return out


def scratch(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A thin (1-2 px), long, gently curved line, brighter or darker than the surface."""
    size, support = scene.size, scene.support()
    start = _anchor(support, rng)
    length = rng.uniform(0.2, 0.5) * size
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    bend = rng.uniform(-0.3, 0.3) * length * np.array([-direction[1], direction[0]])
    t = np.linspace(0, 1, 40)[:, None]
    control, end = start + direction * length / 2 + bend, start + direction * length
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    region = draw_polyline(points, size, width=int(rng.choice([1, 1, 2]))) & support
    strength = rng.uniform(0.06, 0.4) * rng.choice([1, 1, -1])
    return _shade(scene.compose(), region, strength)


def hole(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A small round dark pit with a thin bright rim (radius 1.5 px to 0.06 S)."""
    size, support = scene.size, scene.support()
    center = _anchor(support, rng)
    pit = irregular_blob(rng, size, tuple(center), rng.uniform(1.5, 0.06 * size), 0.15)
    rim = binary_dilation(pit, iterations=int(rng.integers(1, 3))) & ~pit
    image = _shade(scene.compose(), pit & support, -rng.uniform(0.25, 0.75))
    return _shade(image, rim & support, rng.uniform(0.05, 0.25))


def crack(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A thin jagged polyline (random walk) with one or two side branches, darker than the
    surface."""
    size, support = scene.size, scene.support()
    region = np.zeros_like(support)
    start, heading = _anchor(support, rng), rng.uniform(0, 2 * np.pi)
    for branch in range(int(rng.integers(2, 4))):
        steps = int(rng.integers(6, 16)) if branch == 0 else int(rng.integers(3, 8))
        turns = heading + np.cumsum(rng.normal(0, 0.45, steps))
        lengths = rng.uniform(1.5, 3.5, steps)[:, None] * max(size / 128, 0.75)
        moves = np.stack([np.sin(turns), np.cos(turns)], axis=1) * lengths
        points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
        region |= draw_polyline(points, size)
        start = points[int(rng.integers(1, len(points)))]
        heading = turns[0] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
    return _shade(scene.compose(), region & support, -rng.uniform(0.15, 0.6))


def stain(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A soft irregular blob of a random colour (oil, rust, paint, dust), 3-12 % of S across,
    blended at 10-45 % opacity with a smooth falloff."""
    size, support = scene.size, scene.support()
    center = _anchor(support, rng)
    radius = rng.uniform(0.03, 0.12) * size
    region = irregular_blob(rng, size, tuple(center), radius, 0.4) & support
    falloff = gaussian_filter(region.astype(np.float32), radius / 3)
    opacity = rng.uniform(0.1, 0.45) * (0.5 + 0.5 * falloff / max(falloff.max(), 1e-6))
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    image = scene.compose()
    blend = (opacity * region)[..., None]
    return image * (1 - blend) + colour * blend


def missing_piece(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A chunk bitten out of the part's edge, showing the background."""
    assert scene.alpha is not None, "missing_piece needs a part"
    rows, cols = np.nonzero((scene.alpha > 0.2) & (scene.alpha < 0.8))
    pick = int(rng.integers(len(rows)))
    radius = rng.uniform(0.04, 0.1) * scene.size
    chunk = irregular_blob(rng, scene.size, (rows[pick], cols[pick]), radius, 0.3)
    return scene.compose(alpha=np.where(chunk, 0.0, scene.alpha))


TEXTURE_DEFECTS: dict[str, Defect] = {
    "crack": crack,
    "hole": hole,
    "scratch": scratch,
    "stain": stain,
}
OBJECT_DEFECTS: dict[str, Defect] = {
    "contamination": stain,
    "crack": crack,
    "hole": hole,
    "missing_piece": missing_piece,
    "scratch": scratch,
}
