"""A rendered synthetic scene before defects, and the camera step that turns it into pixels.

Defects are drawn on the noise-free scene; the same :class:`Camera` (illumination and sensor
noise) is then applied to the clean and the defective scene, so the exact defect mask is the set
of pixels whose 8-bit values differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion

from fedad.data.raster import pixel_grid, to_uint8


@dataclass(frozen=True)
class Scene:
    """A background, optionally with a part composited over it by its coverage ``alpha``."""

    background: np.ndarray  # float32 [S, S, 3] in [0, 1]
    part: np.ndarray | None = None  # float32 [S, S, 3] in [0, 1]; None for textures
    alpha: np.ndarray | None = None  # float32 [S, S] in [0, 1], coverage of the part

    @property
    def size(self) -> int:
        """Side length S in pixels."""
        return self.background.shape[0]

    def compose(self, alpha: np.ndarray | None = None) -> np.ndarray:
        """Float32 [S, S, 3] image; ``alpha`` [S, S] overrides the part's coverage."""
        if self.part is None:
            return self.background.copy()
        cover = (self.alpha if alpha is None else alpha)[..., None]
        return self.background * (1 - cover) + self.part * cover

    def support(self) -> np.ndarray:
        """Bool [S, S]: where surface defects may be drawn (the part, or the whole texture),
        at least S/64 pixels (at least 1) inside it."""
        margin = max(1, round(self.size / 64))
        inside = np.ones((self.size, self.size), bool) if self.alpha is None else self.alpha > 0.99
        border = np.zeros_like(inside)
        border[margin:-margin, margin:-margin] = True
        return binary_erosion(inside, iterations=margin) & border


@dataclass(frozen=True)
class Camera:
    """Illumination gain and sensor noise applied identically to a clean and a defective scene."""

    gain: np.ndarray  # float32 [S, S, 1]
    noise: np.ndarray  # float32 [S, S, 3]

    @classmethod
    def random(cls, rng: np.random.Generator, size: int, noise_std: tuple[float, float]) -> Camera:
        """Brightness jitter, a linear illumination gradient in a random direction, and
        Gaussian noise with std drawn from ``noise_std`` (low, high)."""
        rows, cols = pixel_grid(size)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((rows - size / 2) * np.sin(angle) + (cols - size / 2) * np.cos(angle)) / size
        gain = rng.uniform(0.85, 1.15) * (1 + rng.uniform(0.0, 0.35) * ramp)
        std = rng.uniform(*noise_std)
        noise = rng.normal(0.0, std, (size, size, 3)).astype(np.float32)
        return cls(gain[..., None].astype(np.float32), noise)

    def shoot(self, image: np.ndarray) -> np.ndarray:
        """Uint8 [S, S, 3] photo of a float [S, S, 3] scene image."""
        return to_uint8(image * self.gain + self.noise)
