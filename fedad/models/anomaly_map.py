"""Gaussian smoothing of anomaly maps: the one smoothing every method's maps go through
(:class:`GaussianSmoothing`, a torch module, so that the scorers that ``fedad predict`` and
``fedad export`` run hold the same kernel as the runs' evaluation, :func:`smooth_maps`), and its
one setting, ``map-sigma`` (:class:`MapSettings`).

``map-sigma`` is in pixels of the map. Its default, -1, keeps each method's own sigma: the
one-model methods give theirs in pixels at 128 x 128, scaled with the image size
(:data:`METHOD_MAP_SIGMA`); the feature heads smooth with :data:`FEATURE_HEAD_MAP_SIGMA`
pixels at any image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

METHOD_MAP_SIGMA = {"msvt": 2.0, "mae": 4.0, "dadda": 2.0}
"""Sigma of each one-model method's maps, pixels at 128 x 128 (the values each method has
always used)."""
FEATURE_HEAD_MAP_SIGMA = 2.0
"""Sigma of the feature heads' maps, pixels (PatchCore's 4 smooths small defects away)."""
OWN = -1.0
"""``map-sigma`` value that keeps the method's own sigma."""


@dataclass(frozen=True)
class MapSettings:
    """Run-config section of every method's anomaly maps (key ``map-sigma``)."""

    map_sigma: float = -1.0
    """Gaussian smoothing of every method's anomaly maps, pixels (0: none, -1: its own)."""

    def __post_init__(self) -> None:
        if not (self.map_sigma >= 0 or self.map_sigma == OWN):
            raise ValueError(f"map-sigma={self.map_sigma}: must be >= 0, or -1 for the "
                             "method's own sigma")

    def sigma(self, method: str, image_size: int) -> float:
        """Sigma in pixels of ``method``'s maps at ``image_size``."""
        if self.map_sigma != OWN:
            return self.map_sigma
        if method in METHOD_MAP_SIGMA:
            return METHOD_MAP_SIGMA[method] * image_size / 128
        return FEATURE_HEAD_MAP_SIGMA


TRUNCATE = 4.0
"""scipy.ndimage.gaussian_filter's default, kept: the kernel reaches this many sigmas."""


def reflected(index: np.ndarray, size: int) -> np.ndarray:
    """Indices [M] (any integers) folded into [0, size) as scipy's ``reflect`` border mode
    does (d c b a | a b c d | d c b a)."""
    folded = np.mod(index, 2 * size)
    return np.where(folded >= size, 2 * size - 1 - folded, folded)


def smoothing_matrix(sigma: float, size: int) -> np.ndarray:
    """[size, size] float64 M with (M @ line) = scipy's 1-D Gaussian filter of a line [size]
    (kernel to TRUNCATE sigmas, ``reflect`` border folded into the matrix)."""
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * offsets.astype(np.float64) ** 2 / sigma**2)
    matrix = np.zeros((size, size))
    rows = np.repeat(np.arange(size), len(offsets))
    columns = reflected((np.arange(size)[:, None] + offsets[None]).ravel(), size)
    np.add.at(matrix, (rows, columns), np.tile(kernel / kernel.sum(), size))
    return matrix


class GaussianSmoothing(nn.Module):
    """maps [B, H, W] -> [B, H, W] (same dtype), each smoothed by a Gaussian of ``sigma``
    pixels (the identity when ``sigma`` is not > 0) as scipy's ``gaussian_filter`` does: along
    H, then W, each pass in float64 and rounded to the maps' dtype in between (anomaly maps of
    density heads span orders of magnitude, where a float32 convolution would move their
    scores by 1e-5 relative). Two matrix products, which ONNX and TorchScript export.

    Args:
        sigma: pixels.
        height: the maps' H; width: their W (default H).
    """

    def __init__(self, sigma: float, height: int, width: int | None = None) -> None:
        super().__init__()
        self.sigma = float(sigma)
        width = height if width is None else width
        self.register_buffer("along_h", torch.from_numpy(self._matrix(height)), False)
        self.register_buffer("along_w", torch.from_numpy(self._matrix(width)).T, False)

    def _matrix(self, size: int) -> np.ndarray:
        return smoothing_matrix(self.sigma, size) if self.sigma > 0 else np.eye(size)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [B, H, W] float -> smoothed [B, H, W], same dtype."""
        if not self.sigma > 0:
            return maps
        columns = (self.along_h @ maps.double()).to(maps.dtype)
        return (columns.double() @ self.along_w).to(maps.dtype)


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """maps [N, H, W] -> [N, H, W] (same dtype), each Gaussian-smoothed with ``sigma`` pixels
    by :class:`GaussianSmoothing`; returned as they are when ``sigma`` is not > 0."""
    if not sigma > 0:
        return maps
    smoothing = GaussianSmoothing(sigma, *maps.shape[1:])
    with torch.no_grad():
        return smoothing(torch.from_numpy(np.ascontiguousarray(maps))).numpy()
