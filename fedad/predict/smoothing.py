"""The Gaussian smoothing of :func:`fedad.models.anomaly_map.smooth_maps` as a torch module, so
that a scorer smooths its maps inside the graph that ONNX / TorchScript export (scipy's filter
cannot be exported): the same kernel (to ``truncate`` = 4 sigmas) and border mode (scipy's
``reflect``, d c b a | a b c d | d c b a), as two matrix products."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TRUNCATE = 4.0
"""scipy.ndimage.gaussian_filter's default: the kernel reaches this many sigmas."""


def reflected(index: np.ndarray, size: int) -> np.ndarray:
    """Indices [M] (any integers) folded into [0, size) as scipy's ``reflect`` mode does."""
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
    """maps [B, H, W] -> [B, H, W], each smoothed by a Gaussian of ``sigma`` pixels as
    :func:`~fedad.models.anomaly_map.smooth_maps` does (the identity when ``sigma`` is not
    > 0): along rows, then columns, each pass in float64 and rounded to float32 in between,
    as scipy's filter computes (anomaly maps of density heads span orders of magnitude, where
    a float32 convolution would move their scores by 1e-5 relative).

    Args:
        sigma: pixels.
        size: the maps' side H = W.
    """

    def __init__(self, sigma: float, size: int) -> None:
        super().__init__()
        self.sigma = float(sigma)
        matrix = smoothing_matrix(sigma, size) if sigma > 0 else np.eye(size)
        self.register_buffer("matrix", torch.from_numpy(matrix), False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [B, H, W] float32 -> smoothed [B, H, W] float32."""
        if not self.sigma > 0:
            return maps
        columns = (self.matrix @ maps.double()).float()
        return (columns.double() @ self.matrix.T).float()
