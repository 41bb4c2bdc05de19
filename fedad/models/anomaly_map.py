"""Gaussian smoothing of anomaly maps: the one function every method's maps go through, and its
one setting, ``map-sigma`` (:class:`MapSettings`).

``map-sigma`` is in pixels of the map. Its default, -1, keeps each method's own sigma: the
one-model methods give theirs in pixels at 128 x 128, scaled with the image size
(:data:`METHOD_MAP_SIGMA`); the feature heads smooth with :data:`FEATURE_HEAD_MAP_SIGMA`
pixels at any image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

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


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """maps [N, H, W] -> [N, H, W] (same dtype), each Gaussian-smoothed with ``sigma`` pixels
    (scipy's ``gaussian_filter``); returned as they are when ``sigma`` is not > 0."""
    if not sigma > 0:
        return maps
    return np.stack([gaussian_filter(m, sigma) for m in maps])
