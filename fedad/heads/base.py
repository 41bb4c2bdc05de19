"""The interface every feature head implements: local fit, server merge, refinement rounds,
patch scoring. Heads work on flattened patch features [N, D] and exchange :class:`Payload`s."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedad.device import CPU, float64_device
from fedad.heads.payload import Payload
from fedad.heads.settings import HeadSettings

if TYPE_CHECKING:
    from fedad.heads.scoring import PatchSet


class FeatureHead(ABC):
    """A density / distance model of normal patch features of width ``dim``.

    Round 1: each site calls :meth:`fit_local`; the server calls :meth:`merge`. Later rounds:
    each site calls :meth:`refine_local` on the global head; the server calls :meth:`refine`.
    A head computes on ``device`` (the CPU for MPS, which has no float64: see
    :func:`fedad.device.float64_device`) whatever device its features come from; payloads are
    numpy, :meth:`patch_scores` returns a tensor on ``device``.
    """

    fit_kind: str  # payload kind of a fitted head
    refine_kind: str  # payload kind of a site's refinement reply
    refines: bool = True
    """Whether rounds after the first change the head (False: the workflow runs one round)."""

    def __init__(self, settings: HeadSettings, dim: int, seed: int = 0,
                 grid: tuple[int, int] | None = None,
                 device: torch.device = CPU) -> None:
        self.settings = settings
        self.dim = dim
        self.seed = seed
        self.grid = grid  # (h, w) of the feature maps, for heads that model patch positions
        self.device = float64_device(device)

    def rows(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features [N, D] checked (:func:`check_features`), float32 on the head's
        device."""
        return check_features(features, self.dim).to(self.device)  # no copy where it is

    def tensor(self, array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A payload's numpy ``array`` as a ``dtype`` tensor on the head's device."""
        return torch.from_numpy(np.asarray(array)).to(self.device, dtype)

    @property
    def sizes(self) -> dict[str, int]:
        """Values of the payload templates' symbols (``K``, ``D``)."""
        return {"K": self.num_units, "D": self.dim}

    @property
    @abstractmethod
    def num_units(self) -> int:
        """Number of prototypes / components (K)."""

    def reference_shapes(self, kind: str) -> dict[str, tuple[int, ...]] | None:
        """Expected arrays of a payload of ``kind`` when no template fixes them (flows)."""
        return None

    def fit_rows(self, patches: PatchSet, seed: int) -> torch.Tensor:
        """The rows [M, D] a site fits on from its patch features [N, D, h, w]: a seeded
        subsample of ``max-patches`` of them (a head that models positions takes them all)."""
        return patches.flat(self.settings.max_patches, seed=seed)

    @abstractmethod
    def fit_local(self, features: torch.Tensor) -> Payload:
        """A site's head from its normal patch features [N, D]."""

    @abstractmethod
    def merge(self, payloads: list[Payload]) -> Payload:
        """The global head from the sites' fitted heads."""

    @abstractmethod
    def refine_local(self, head: Payload, features: torch.Tensor) -> Payload:
        """A site's refinement statistics (or weights) for the global ``head``."""

    @abstractmethod
    def refine(self, head: Payload, payloads: list[Payload]) -> Payload:
        """The refined global head from the sites' refinement replies."""

    @abstractmethod
    def patch_scores(self, head: Payload, features: torch.Tensor) -> torch.Tensor:
        """Anomaly score [N] of patch features [N, D] under ``head`` (higher = more anomalous)."""


def check_features(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Assert finite [N, D] patch features at a head's border; returns them as float32."""
    if features.dim() != 2 or features.shape[1] != dim or not torch.isfinite(features).all():
        raise ValueError(f"patch features: expected finite [N, {dim}], got "
                         f"{list(features.shape)}")
    return features.float()
