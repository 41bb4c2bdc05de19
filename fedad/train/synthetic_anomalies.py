"""Generic synthetic anomalies made on the fly from normal images (DRAEM and CutPaste style).

They give a supervised detector pixel-exact "defects" without any real defect image:
- ``perlin``: a thresholded Perlin-noise region filled with a blend of a foreign texture
  (another image of the batch, shuffled and colour-jittered, or a noise pattern) and the original
  (Zavrtanik et al., DRAEM, ICCV 2021);
- ``scar``: a thin rotated strip cut from the same image, jittered and pasted elsewhere
  (Li et al., CutPaste, CVPR 2021).
Two extents: ``large`` (the papers' sizes: regions of up to half the image, scars 2-6 % of the
side wide) and ``small`` (the hard end of real defects: Perlin regions cut to a disc of 2-6 % of
the side, fainter blends, scars 1-2 % of the side wide), for validation splits that should not
be easier than the defects a detector must find.
Nothing here knows fedad's synthetic data generator: the same code runs on real images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EXTENTS", "AnomalySynthesizer", "perlin_noise"]


@dataclass(frozen=True)
class Extent:
    """Size ranges (fractions of the image side unless in pixels) and blend strength of the
    anomalies."""

    region_radius: tuple[float, float] | None  # Perlin region cut to a disc; None: uncut
    keep_original: tuple[float, float]  # beta: share of the original kept in a Perlin region
    scar_length: tuple[float, float]
    scar_width: tuple[float, float]
    min_scar_width: int  # pixels
    min_pixels: int  # smallest Perlin region


EXTENTS = {
    "large": Extent(None, (0.0, 0.7), (0.15, 0.5), (0.02, 0.06), 2, 16),
    "small": Extent((0.02, 0.06), (0.3, 0.8), (0.1, 0.3), (0.008, 0.02), 1, 4),
}


def perlin_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise.

    Args:
        size: output side length in pixels.
        cells: number of lattice cells per side (the noise's spatial frequency).
        rng: random generator.
    Returns:
        float32 array [size, size], roughly in [-1, 1].
    """
    angles = rng.uniform(0, 2 * math.pi, (cells + 1, cells + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    coords = np.linspace(0, cells, size, endpoint=False)
    cell = coords.astype(int)
    frac = coords - cell
    fy, fx = np.meshgrid(frac, frac, indexing="ij")
    cy, cx = np.meshgrid(cell, cell, indexing="ij")

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[cy + dy, cx + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return ((top * (1 - uy) + bottom * uy) * math.sqrt(2)).astype(np.float32)


class AnomalySynthesizer:
    """Adds synthetic anomalies to a batch of normal images.

    Args:
        probability: chance that a given image of the batch is made anomalous.
        seed: seed of the generator (each instance is deterministic).
        extent: "large" or "small" (EXTENTS).
    """

    def __init__(self, probability: float = 0.5, seed: int = 0, extent: str = "large") -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability={probability}: must be in [0, 1]")
        if extent not in EXTENTS:
            raise ValueError(f"extent={extent!r}: must be one of {sorted(EXTENTS)}")
        self.probability = probability
        self.extent = EXTENTS[extent]
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a random subset of ``images``.

        Args:
            images: [B, 3, H, W] float in [0, 1], normal images.
        Returns:
            (images [B, 3, H, W] in [0, 1], masks [B, 1, H, W] in {0, 1}); unchanged images get
            an all-zero mask.
        """
        torch._assert(images.dim() == 4 and images.shape[1] == 3, "images must be [B,3,H,W]")
        out = images.clone()
        masks = torch.zeros_like(images[:, :1])
        b = images.shape[0]
        for i in range(b):
            if self.rng.random() >= self.probability:
                continue
            donor = images[int(self.rng.integers(b))]
            if self.rng.random() < 0.6:
                out[i], masks[i] = self._perlin(images[i], donor)
            else:
                out[i], masks[i] = self._scar(images[i])
        return out.clamp_(0, 1), masks

    def _perlin(
        self, image: torch.Tensor, donor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Perlin-region anomaly: [3,H,W] -> ([3,H,W], [1,H,W])."""
        size, extent = image.shape[-1], self.extent
        mask = np.zeros((size, size), dtype=np.float32)
        while mask.sum() < extent.min_pixels:  # at least a few pixels, like DRAEM's retry
            cells = int(2 ** self.rng.integers(1, 4)) * max(1, size // 128)
            noise = perlin_noise(size, cells, self.rng)
            noise = np.rot90(noise, k=int(self.rng.integers(4))).copy()
            mask = (noise > self.rng.uniform(0.35, 0.6)).astype(np.float32)
            if extent.region_radius is not None:
                mask *= self._disc(size, self.rng.uniform(*extent.region_radius) * size)
        m = torch.from_numpy(mask)[None]
        texture = self._foreign_texture(image, donor)
        beta = float(self.rng.uniform(*extent.keep_original))
        blended = (1 - m) * image + m * ((1 - beta) * texture + beta * image)
        return blended, m

    def _disc(self, size: int, radius: float) -> np.ndarray:
        """A disc of ``radius`` pixels at a random centre, float32 [size, size] in {0, 1}."""
        cy, cx = self.rng.uniform(radius, size - radius, 2)
        yy, xx = np.mgrid[:size, :size]
        return (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).astype(np.float32)

    def _foreign_texture(self, image: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
        """Fill of a Perlin region [3,H,W]: a flipped, rolled, colour-jittered donor; structured
        noise; or the image itself re-tinted (a subtle colour or brightness change)."""
        size = donor.shape[-1]
        kind = self.rng.random()
        if kind < 0.4:
            tex = torch.flip(donor, dims=[int(self.rng.integers(1, 3))])
            shifts = tuple(int(s) for s in self.rng.integers(0, size, 2))
            return self._jitter(torch.roll(tex, shifts=shifts, dims=(1, 2)), 0.6, 0.3)
        if kind < 0.7:
            return self._jitter(image, 0.3, 0.15)
        base = torch.from_numpy(self.rng.uniform(0, 1, (3, 1, 1)).astype(np.float32))
        cells = int(self.rng.integers(4, 33))
        noise = torch.from_numpy(perlin_noise(size, cells, self.rng))[None]
        return (base + 0.3 * noise).clamp(0, 1).expand(3, size, size)

    def _jitter(self, image: torch.Tensor, gain: float, shift: float) -> torch.Tensor:
        """Per-channel gain in 1 +- ``gain`` and offset in +- ``shift``, clamped to [0, 1]."""
        g = torch.from_numpy(self.rng.uniform(1 - gain, 1 + gain, (3, 1, 1)).astype(np.float32))
        o = torch.from_numpy(self.rng.uniform(-shift, shift, (3, 1, 1)).astype(np.float32))
        return (image * g + o).clamp(0, 1)

    def _scar(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CutPaste-scar anomaly: a thin rotated strip of the image pasted elsewhere."""
        size, extent = image.shape[-1], self.extent
        length = int(self.rng.uniform(*extent.scar_length) * size)
        width = max(extent.min_scar_width, int(self.rng.uniform(*extent.scar_width) * size))
        strip = torch.zeros(1, size, size)
        y0, x0 = (size - width) // 2, (size - length) // 2
        strip[:, y0 : y0 + width, x0 : x0 + length] = 1.0
        angle = float(self.rng.uniform(-math.pi, math.pi))
        dy, dx = (self.rng.uniform(-0.35, 0.35, 2) * 2).tolist()
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, dx], [sin, cos, dy]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
        mask = (F.grid_sample(strip[None], grid, align_corners=False)[0] > 0.5).float()
        if mask.sum() < 4:
            return image, torch.zeros(1, size, size)
        shift = tuple(int(s) for s in self.rng.integers(size // 8, size - size // 8, 2))
        source = torch.roll(image, shifts=shift, dims=(1, 2))
        return (1 - mask) * image + mask * self._jitter(source, 0.4, 0.0), mask
