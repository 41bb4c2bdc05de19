"""NexViTAD's prototype memory bank: normal patch features clustered into K prototypes; a
patch's anomaly score is its Euclidean distance to the nearest prototype (§3.2).

Clustering: Sinkhorn K-means (default), plain k-means, or a PatchCore greedy coreset of K
patches (a centralized baseline only: its prototypes *are* patch features, so it never
crosses). Federated: sites send their K prototypes and how many patches each one holds; the
server clusters the union, weighted by those counts, into K global prototypes. Refinement
rounds are federated Lloyd steps: sites send per-prototype sums and counts of their patches
nearest to each global prototype; the server moves each prototype to the pooled mean.
"""

from __future__ import annotations

import numpy as np
import torch

from fedad.heads.base import FeatureHead
from fedad.heads.clustering import greedy_coreset, hard_counts, kmeans, sinkhorn_kmeans
from fedad.heads.payload import Payload


class MemoryBankHead(FeatureHead):
    """K prototypes [K, D] of normal patch features."""

    fit_kind = "prototypes"
    refine_kind = "cluster-stats"

    @property
    def num_units(self) -> int:
        return self.settings.num_prototypes

    def cluster(self, points: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """points [N, D] (weights [N]) -> K prototypes [K, D] by the configured clustering."""
        k = self.num_units
        if k > len(points):
            raise ValueError(f"num-prototypes={k}: only {len(points)} patches to cluster")
        method = self.settings.bank_clustering
        if method == "sinkhorn":
            centres = sinkhorn_kmeans(points, k, weights=weights,
                                      epsilon=self.settings.sinkhorn_epsilon, seed=self.seed)
        elif method == "kmeans":
            centres = kmeans(points, k, weights=weights, seed=self.seed)
        else:
            centres = points[greedy_coreset(points, k, seed=self.seed)]
        return centres

    def fit_local(self, features: torch.Tensor) -> Payload:
        """Site: K prototypes of patch features [N, D] and the patch count of each."""
        features = self.rows(features)
        prototypes = self.cluster(features)
        counts = hard_counts(features, prototypes)
        return _prototypes(prototypes, counts.clamp_min(1e-3), len(features))

    def merge(self, payloads: list[Payload]) -> Payload:
        """Server: cluster the union of the sites' prototypes, weighted by their counts."""
        points = self.tensor(np.concatenate([p.arrays["prototypes"] for p in payloads]))
        weights = self.tensor(np.concatenate([p.arrays["counts"] for p in payloads]))
        prototypes = self.cluster(points, weights)
        counts = hard_counts(points, prototypes, weights)
        return _prototypes(prototypes, counts.clamp_min(1e-3), sum(p.count for p in payloads))

    def refine_local(self, head: Payload, features: torch.Tensor) -> Payload:
        """Site: per-prototype sums [K, D] and counts [K] of its patches nearest to each."""
        features = self.rows(features)
        prototypes = self.tensor(head.arrays["prototypes"], torch.float64)
        nearest = torch.cdist(features.double(), prototypes).argmin(1)
        ones = torch.ones(len(features), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(prototypes), dtype=torch.float64,
                             device=self.device).index_add_(0, nearest, ones)
        sums = torch.zeros_like(prototypes).index_add_(0, nearest, features.double())
        return Payload(self.refine_kind, {"sums": sums.cpu().numpy(),
                                          "counts": counts.cpu().numpy()}, len(features))

    def refine(self, head: Payload, payloads: list[Payload]) -> Payload:
        """Server: one Lloyd step on the pooled statistics (an empty prototype stays put)."""
        counts = np.sum([p.arrays["counts"] for p in payloads], axis=0)
        sums = np.sum([p.arrays["sums"] for p in payloads], axis=0)
        prototypes = head.arrays["prototypes"].astype(np.float64).copy()
        filled = counts > 0
        prototypes[filled] = sums[filled] / counts[filled, None]
        return _prototypes(torch.from_numpy(prototypes), torch.from_numpy(counts).clamp_min(1e-3),
                           sum(p.count for p in payloads))

    def patch_scores(self, head: Payload, features: torch.Tensor) -> torch.Tensor:
        """Distance [N] of each patch feature [N, D] to its nearest prototype."""
        return torch.cdist(self.rows(features), self.tensor(head.arrays["prototypes"])).amin(1)


def _prototypes(prototypes: torch.Tensor, counts: torch.Tensor, count: int) -> Payload:
    return Payload("prototypes", {"prototypes": prototypes.float().cpu().numpy(),
                                  "counts": counts.float().cpu().numpy()}, count)
