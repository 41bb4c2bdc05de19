"""What a detector outputs on an evaluation set, in one method-independent form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Predictions:
    """Model outputs on an evaluation set (numpy, CPU).

    ``maps`` and ``image_scores`` lie in [0, 1]; 0.5 is the method's decision threshold.
    ``ranking_scores``, when a method calibrates through a saturating function, holds the
    uncalibrated image scores the rank metrics use (they do not tie where the calibration
    reaches exactly 0 or 1); :meth:`ranked` returns them, else ``image_scores``.
    """

    labels: np.ndarray  # [N] {0,1}
    defect_classes: np.ndarray  # [N] index into the dataset's defect types
    image_scores: np.ndarray  # [N] in [0,1]
    masks: np.ndarray  # [N, H, W] {0,1}
    maps: np.ndarray  # [N, H, W] in [0,1]
    images: np.ndarray  # [N, H, W, 3] in [0,1], for plots
    ranking_scores: np.ndarray | None = None  # [N] uncalibrated, or None

    def ranked(self) -> np.ndarray:
        """[N] the image scores to rank (AUROC, ROC curves): ranking_scores if given."""
        return self.image_scores if self.ranking_scores is None else self.ranking_scores

    def check(self) -> Predictions:
        """Assert consistent shapes and finite scores at the module border; returns self."""
        n = len(self.labels)
        rows = {name: getattr(self, name) for name in
                ("defect_classes", "image_scores", "masks", "maps", "images")}
        if self.ranking_scores is not None:
            rows["ranking_scores"] = self.ranking_scores
        for name, values in rows.items():
            if len(values) != n:
                raise ValueError(f"Predictions.{name}: {len(values)} rows != {n}")
        if self.maps.shape != self.masks.shape:
            raise ValueError(f"Predictions: maps {self.maps.shape} != masks {self.masks.shape}")
        for name in ("image_scores", "maps", "ranking_scores"):
            if name in rows and not np.isfinite(rows[name]).all():
                raise FloatingPointError(f"Predictions.{name}: non-finite values")
        return self
