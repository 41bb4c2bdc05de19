"""Gaussian smoothing of anomaly maps, the one function every method's maps go through.

The one-model methods give their sigma in pixels at 128 x 128 and scale it with the image
size (:func:`method_sigma`); the feature heads give theirs in pixels of the map
(``map-sigma``, fedad/heads/settings.py), which is the same at the default image size 128.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

METHOD_MAP_SIGMA = {"msvt": 2.0, "mae": 4.0, "dadda": 2.0}
"""Sigma of each one-model method's maps, pixels at 128 x 128 (the values each method has
always used)."""


def method_sigma(method: str, image_size: int) -> float:
    """``method``'s sigma (:data:`METHOD_MAP_SIGMA`) in pixels of ``image_size`` maps."""
    return METHOD_MAP_SIGMA[method] * image_size / 128


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """maps [N, H, W] -> [N, H, W] (same dtype), each Gaussian-smoothed with ``sigma`` pixels
    (scipy's ``gaussian_filter``); returned as they are when ``sigma`` is not > 0."""
    if not sigma > 0:
        return maps
    return np.stack([gaussian_filter(m, sigma) for m in maps])
