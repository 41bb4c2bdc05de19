"""Sinkhorn K-means, k-means and the coreset: balanced marginals, recovered clusters, weights."""

import pytest
import torch

from fedad.heads.clustering import (
    greedy_coreset,
    kmeans,
    relative_cost,
    sinkhorn,
    sinkhorn_kmeans,
)

MARGINAL_TOLERANCE = 0.011  # sinkhorn's default stopping rule: 1e-2 on the log scale


def blobs(sizes, dim=8, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(len(sizes), dim, generator=generator)
    points = torch.cat([c + spread * torch.randn(n, dim, generator=generator)
                        for c, n in zip(centres, sizes, strict=True)])
    return points, centres


def test_sinkhorn_plan_has_the_requested_marginals_within_tolerance():
    generator = torch.Generator().manual_seed(1)
    cost = torch.rand(300, 7, generator=generator) * 3
    rows = torch.rand(300, generator=generator) + 0.5
    plan = sinkhorn(cost, rows, epsilon=0.05)
    assert plan.shape == (300, 7) and (plan >= 0).all()
    column_share = plan.sum(0) * 7  # 1 when perfectly balanced
    row_share = plan.sum(1) / (rows / rows.sum())
    assert (column_share - 1).abs().max() < MARGINAL_TOLERANCE
    assert (row_share - 1).abs().max() < MARGINAL_TOLERANCE


def test_sinkhorn_balances_prototypes_that_nearest_assignment_would_not():
    points, _ = blobs([540, 60])  # one dominant mode
    prototypes = sinkhorn_kmeans(points, 4, seed=0)
    cost = torch.cdist(points, prototypes).pow(2)
    plan = sinkhorn(relative_cost(cost), torch.ones(len(points)), 0.05)
    assert (plan.sum(0) * 4 - 1).abs().max() < MARGINAL_TOLERANCE
    nearest_share = torch.bincount(cost.argmin(1), minlength=4) / len(points)
    assert nearest_share.min() > 0  # every prototype is used by the data


def test_both_clusterings_recover_well_separated_equal_clusters():
    points, centres = blobs([100, 100, 100])
    for found in (sinkhorn_kmeans(points, 3, seed=0), kmeans(points, 3, seed=0)):
        assert found.shape == (3, 8) and torch.isfinite(found).all()
        assert torch.cdist(centres, found).amin(1).max() < 0.3


def test_sinkhorn_prototypes_do_not_collapse_on_whitened_features():
    # Whitened patch features are close to isotropic: every squared distance is about twice
    # the dimension. Regularising relative to that distance made every prototype the mean;
    # relative to the gaps between prototypes they spread like plain k-means'.
    points = torch.randn(2000, 150, generator=torch.Generator().manual_seed(0))

    def spread(prototypes: torch.Tensor) -> float:
        k = len(prototypes)
        return float(torch.cdist(prototypes, prototypes).sum() / (k * (k - 1)))

    assert spread(sinkhorn_kmeans(points, 5, seed=0)) > 0.8 * spread(kmeans(points, 5, seed=0))


def test_relative_cost_is_shift_free_per_row_and_scale_free():
    cost = torch.rand(50, 6, generator=torch.Generator().manual_seed(2))
    shifted = 3 * cost + torch.arange(50.0)[:, None]  # per-row offsets, global scale
    assert torch.allclose(relative_cost(cost), relative_cost(shifted), atol=1e-5)
    assert (relative_cost(cost).min(1).values == 0).all()


def test_weights_act_as_repeated_points():
    points, _ = blobs([20, 20, 20], seed=3)
    repeated = torch.cat([points, points[:20]])  # first blob twice
    weights = torch.cat([2 * torch.ones(20), torch.ones(40)])
    for cluster in (kmeans, sinkhorn_kmeans):
        a = cluster(repeated, 3, seed=0)
        b = cluster(points, 3, weights=weights, seed=0)
        assert torch.cdist(a, b).amin(1).max() < 0.2, cluster.__name__


def test_bad_inputs_are_refused():
    points, _ = blobs([5])
    with pytest.raises(ValueError, match="k=6"):
        sinkhorn_kmeans(points, 6)
    with pytest.raises(ValueError, match="weights"):
        kmeans(points, 2, weights=-torch.ones(5))
    with pytest.raises(ValueError, match="finite"):
        kmeans(points * float("nan"), 2)


def test_coreset_covers_the_set_better_than_random_points():
    points, _ = blobs([200, 20, 5], seed=2)
    chosen = greedy_coreset(points, 6, seed=0)
    assert len(set(chosen.tolist())) == 6
    cover = torch.cdist(points, points[chosen]).amin(1).max()
    random_ = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:6]
    assert cover < torch.cdist(points, points[random_]).amin(1).max()
