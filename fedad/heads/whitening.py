"""Federated whitening of patch features (``feature-whitening``).

ImageNet channels differ widely in their spread over normal patches, so a Euclidean distance
(the memory bank) is ruled by the few channels that vary most on normal images (colour,
illumination, pose) rather than by the ones a defect moves. Whitening with the normal patches'
covariance (a Mahalanobis metric, as in PaDiM) puts every direction on the same scale.

Federated form: each site sends its patch count, mean [D] and second moment [D, D] (a
``feature-moments`` payload: statistics, never features); the server pools them exactly and
sends back the mean and the whitening matrix, which every site and the server's scoring apply
before the head. The covariance is shrunk towards a scaled identity (``SHRINKAGE`` of its mean
variance) so that directions with almost no normal variance are not blown up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import RecordDict

from fedad.heads.payload import Payload, attach_arrays, attached_arrays

SHRINKAGE = 0.01
RECORD = "whitening"


def feature_moments(features: torch.Tensor) -> Payload:
    """A site's ``feature-moments`` payload of its normal patch features [N, D]:
    mean [D] and second moment E[x x^T] [D, D] (float64), count N."""
    if features.dim() != 2 or not len(features) or not torch.isfinite(features).all():
        raise ValueError(f"feature_moments: expected finite [N, D], got {list(features.shape)}")
    x = features.double()
    return Payload("feature-moments", {"mean": x.mean(0).cpu().numpy(),
                                       "second": (x.T @ x / len(x)).cpu().numpy()}, len(x))


@dataclass(frozen=True)
class Whitening:
    """f -> (f - mean) @ matrix for patch features; ``matrix`` [D, D] is symmetric."""

    mean: np.ndarray  # [D]
    matrix: np.ndarray  # [D, D]

    @classmethod
    def from_moments(cls, payloads: list[Payload]) -> Whitening:
        """Pool the sites' moments (weighted by their counts) into the ZCA whitening
        C_s^{-1/2} of the shrunk covariance C_s = C + SHRINKAGE * mean(diag C) * I."""
        if not payloads:
            raise ValueError("Whitening.from_moments: no feature-moments payloads")
        counts = np.array([p.count for p in payloads], np.float64)
        weights = counts / counts.sum()
        mean = sum(w * p.arrays["mean"] for w, p in zip(weights, payloads, strict=True))
        second = sum(w * p.arrays["second"] for w, p in zip(weights, payloads, strict=True))
        covariance = second - np.outer(mean, mean)
        covariance = (covariance + covariance.T) / 2
        covariance += SHRINKAGE * max(np.trace(covariance) / len(mean), 1e-12) * np.eye(len(mean))
        values, vectors = np.linalg.eigh(covariance)
        matrix = (vectors * values.clip(1e-12) ** -0.5) @ vectors.T
        return cls(mean.astype(np.float32), matrix.astype(np.float32))

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Whitened features: [N, D] -> [N, D] float32, on the features' device."""
        mean = torch.from_numpy(self.mean).to(features.device)
        matrix = torch.from_numpy(self.matrix).to(features.device)
        if features.dim() != 2 or features.shape[1] != len(mean):
            raise ValueError(f"whitening of width {len(mean)} applied to features "
                             f"{list(features.shape)}")
        return (features.float() - mean) @ matrix

    def add_to(self, content: RecordDict) -> RecordDict:
        """``content`` with the whitening as its ``whitening`` array record."""
        return attach_arrays(content, RECORD, {"mean": self.mean, "matrix": self.matrix})

    @classmethod
    def from_content(cls, content: RecordDict, dim: int) -> Whitening | None:
        """The whitening a message carries (None when it carries none), checked: mean [dim],
        matrix [dim, dim], finite floats; PayloadError otherwise."""
        arrays = attached_arrays(content, RECORD, {"mean": (dim,), "matrix": (dim, dim)})
        return None if arrays is None else cls(arrays["mean"], arrays["matrix"])


def whiten(features: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    """``features`` [N, D] whitened by ``whitening``, or as they are without one
    (``feature-whitening=false``)."""
    return features if whitening is None else whitening.apply(features)
