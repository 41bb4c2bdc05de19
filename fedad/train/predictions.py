"""What a detector outputs on an evaluation set, in one method-independent form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    """Model outputs on an evaluation set (numpy, CPU).

    ``maps`` and ``image_scores`` lie in [0, 1]; 0.5 is the method's decision threshold.
    """

    labels: np.ndarray  # [N] {0,1}
    defect_classes: np.ndarray  # [N] index into the dataset's defect types
    image_scores: np.ndarray  # [N] in [0,1]
    masks: np.ndarray  # [N, H, W] {0,1}
    maps: np.ndarray  # [N, H, W] in [0,1]
    images: np.ndarray  # [N, H, W, 3] in [0,1], for plots

    def check(self) -> Predictions:
        """Assert consistent shapes and finite scores at the module border; returns self."""
        n = len(self.labels)
        for name in ("defect_classes", "image_scores", "masks", "maps", "images"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Predictions.{name}: {len(getattr(self, name))} rows != {n}")
        if self.maps.shape != self.masks.shape:
            raise ValueError(f"Predictions: maps {self.maps.shape} != masks {self.masks.shape}")
        for name in ("image_scores", "maps"):
            if not np.isfinite(getattr(self, name)).all():
                raise FloatingPointError(f"Predictions.{name}: non-finite values")
        return self
