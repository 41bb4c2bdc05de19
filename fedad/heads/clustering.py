"""Clustering of patch features into prototypes: Sinkhorn K-means, plain k-means, coresets.

Sinkhorn K-means (NexViTAD §3.2, after Cuturi 2013 / Caron et al. 2020) alternates an
entropy-regularised optimal-transport assignment whose cluster marginals are forced to be
uniform (every prototype receives the same share of the data mass) with a weighted mean
update. Points may carry weights (counts): the server merges client prototypes this way.
"""

from __future__ import annotations

import math

import torch

SINKHORN_EPSILON = 0.05
"""Entropy regularisation, relative to the median gap of a problem (:func:`relative_cost`)."""
ASSIGNMENT_ITERATIONS = 3
"""Sinkhorn iterations per assignment step of :func:`sinkhorn_kmeans` (SwAV's 3): at this
epsilon the plan takes far more than 100 iterations to meet a 1 % marginal tolerance, so a full
solve per step cost 100 log-sum-exp passes over [N, K] (70-100 s per site at the heads'
defaults) for prototypes no better placed; three passes balance the step approximately, and
the k-means steps go on from there."""


def _check_points(points: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    if points.dim() != 2 or not torch.isfinite(points).all():
        raise ValueError(f"points: expected finite [N, D], got {list(points.shape)}")
    if not 1 <= k <= len(points):
        raise ValueError(f"k={k}: must be in [1, N={len(points)}]")
    if weights is None:
        return torch.ones(len(points), dtype=points.dtype, device=points.device)
    if weights.shape != (len(points),) or not (weights > 0).all():
        raise ValueError(f"weights: expected positive [N={len(points)}], got {weights.shape}")
    return weights.to(points)


def kmeans_plus_plus(points: torch.Tensor, k: int, weights: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: points [N, D], weights [N] -> initial centres [k, D] (the draws on
    the CPU with ``generator``, the distances on the points' device)."""
    first = torch.multinomial(weights.cpu(), 1, generator=generator)
    centres = [points[first[0]]]
    closest = torch.cdist(points, centres[0][None]).squeeze(1).pow(2)
    for _ in range(1, k):
        mass = (weights * closest).cpu()
        if mass.sum() <= 0:  # fewer distinct points than k: repeat one
            index = torch.multinomial(weights.cpu(), 1, generator=generator)
        else:
            index = torch.multinomial(mass, 1, generator=generator)
        centres.append(points[index[0]])
        closest = torch.minimum(closest, torch.cdist(points, centres[-1][None]).squeeze(1).pow(2))
    return torch.stack(centres)


def sinkhorn(cost: torch.Tensor, row_mass: torch.Tensor, epsilon: float,
             max_iterations: int = 100, tolerance: float = 1e-2) -> torch.Tensor:
    """Entropic optimal transport plan [N, K] for cost [N, K]: rows sum to ``row_mass`` [N]
    (normalised to a distribution), columns to 1/K each, up to a relative ``tolerance`` on the
    column sums (on the log scale: 1e-2 is a 1 % deviation); computed in the log domain."""
    k = cost.shape[1]
    log_rows = torch.log(row_mass / row_mass.sum())
    log_cols = torch.full((k,), -math.log(k), dtype=cost.dtype, device=cost.device)
    log_kernel = -cost / epsilon
    v = torch.zeros(k, dtype=cost.dtype, device=cost.device)
    for _ in range(max_iterations):
        u = log_rows - torch.logsumexp(log_kernel + v[None, :], dim=1)
        column_log_mass = torch.logsumexp(log_kernel + u[:, None], dim=0)
        if (column_log_mass - log_cols).abs().max() < tolerance:
            break
        v = log_cols - column_log_mass
    return torch.exp(log_kernel + u[:, None] + v[None, :])


def relative_cost(cost: torch.Tensor) -> torch.Tensor:
    """Cost [N, K] -> cost measured from each row's minimum, in units of the median of the
    positive gaps (how much farther a point is from another prototype than from its nearest).

    The Sinkhorn plan does not change when a row's cost moves by a constant, so only the
    scale matters: dividing by the median *distance* instead makes the regularisation depend
    on where the data lie. On whitened features, whose squared distances are all about twice
    the dimension, that is far softer than the gaps between prototypes, and every prototype
    collapses onto the mean (soft k-means above its critical temperature).
    """
    gaps = cost - cost.min(dim=1, keepdim=True).values
    positive = gaps[gaps > 0]
    return gaps / (positive.median() if len(positive) else 1.0)


def sinkhorn_kmeans(points: torch.Tensor, k: int, *, weights: torch.Tensor | None = None,
                    iterations: int = 20, epsilon: float = SINKHORN_EPSILON,
                    seed: int = 0) -> torch.Tensor:
    """Balanced K-means: points [N, D] (optional weights [N]) -> prototypes [k, D].

    Each iteration assigns the (weighted) points to prototypes by :data:`ASSIGNMENT_ITERATIONS`
    Sinkhorn iterations towards uniform prototype marginals, then moves each prototype to the
    plan-weighted mean (until the largest move is below 1e-4 of the prototypes' mean norm).
    ``epsilon`` is relative to the median squared point-prototype distance. float32
    throughout.
    """
    weights = _check_points(points, weights, k)
    generator = torch.Generator().manual_seed(seed)
    centres = kmeans_plus_plus(points, k, weights, generator)
    for _ in range(iterations):
        cost = torch.cdist(points, centres).pow(2)
        plan = sinkhorn(relative_cost(cost), weights, epsilon, ASSIGNMENT_ITERATIONS)
        moved = (plan.T @ points) / plan.sum(0).clamp_min(1e-30)[:, None]
        shift = (moved - centres).norm(dim=1).max() / centres.norm(dim=1).mean().clamp_min(1e-12)
        centres = moved
        if shift < 1e-4:
            break
    return centres


def kmeans(points: torch.Tensor, k: int, *, weights: torch.Tensor | None = None,
           iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Plain (Lloyd) weighted k-means: points [N, D], weights [N] -> prototypes [k, D];
    an emptied cluster keeps its previous centre."""
    weights = _check_points(points, weights, k)
    points = points.double()
    weights = weights.double()
    centres = kmeans_plus_plus(points, k, weights, torch.Generator().manual_seed(seed))
    for _ in range(iterations):
        nearest = torch.cdist(points, centres).argmin(1)
        mass = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(
            0, nearest, weights)
        sums = torch.zeros_like(centres).index_add_(0, nearest, points * weights[:, None])
        filled = mass > 0
        centres[filled] = sums[filled] / mass[filled, None]
    return centres.float()


def hard_counts(points: torch.Tensor, centres: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """(Weighted) number of points [N, D] whose nearest centre [K, D] is each centre -> [K]."""
    nearest = torch.cdist(points.double(), centres.double()).argmin(1)
    weights = torch.ones(len(points), device=points.device) if weights is None else weights
    return torch.zeros(len(centres), dtype=torch.float64, device=points.device).index_add_(
        0, nearest, weights.double()).float()


def greedy_coreset(points: torch.Tensor, size: int, *, projection_dim: int = 128,
                   seed: int = 0) -> torch.Tensor:
    """PatchCore's greedy k-center coreset: points [N, D] -> indices [size] of the points that
    best cover the set (distances measured after a seeded random projection to
    ``projection_dim``, as in PatchCore)."""
    if not 1 <= size <= len(points):
        raise ValueError(f"coreset size={size}: must be in [1, N={len(points)}]")
    generator = torch.Generator().manual_seed(seed)
    reduced = points
    if points.shape[1] > projection_dim:
        matrix = torch.randn(points.shape[1], projection_dim, generator=generator).to(points)
        reduced = points @ matrix / math.sqrt(projection_dim)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    closest = torch.cdist(reduced, reduced[chosen[0]][None]).squeeze(1)
    for _ in range(1, size):
        chosen.append(int(closest.argmax()))
        closest = torch.minimum(closest, torch.cdist(reduced, reduced[chosen[-1]][None]).squeeze(1))
    return torch.tensor(chosen)
