"""Federated heads against centralized ones: two sites holding half a dataset each."""

import dataclasses

import numpy as np
import pytest
import torch

from fedad.heads.flow import FlowHead
from fedad.heads.gmm import GaussianMixtureHead
from fedad.heads.memory_bank import MemoryBankHead
from fedad.heads.settings import HeadSettings
from fedad.metrics import auroc

DIM = 8
SCORE_TOLERANCE = 0.10  # mean |federated - centralized| patch score / mean centralized score
AUROC_TOLERANCE = 0.02


def normal_features(n, seed):
    """A 'normal' patch distribution: 6 anisotropic modes in 8-D."""
    generator = torch.Generator().manual_seed(100)
    centres = 3 * torch.randn(6, DIM, generator=generator)
    scales = 0.3 + torch.rand(6, DIM, generator=generator)
    generator.manual_seed(seed)
    modes = torch.randint(6, (n,), generator=generator)
    return centres[modes] + scales[modes] * torch.randn(n, DIM, generator=generator)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split():
    data = normal_features(2000, seed=1)
    normal = normal_features(500, seed=2)
    anomalous = normal_features(500, seed=3) + 2.5 * torch.randn(500, DIM)
    return data, [data[:1000], data[1000:]], normal, anomalous


def separation(head, payload, normal, anomalous):
    scores = torch.cat([head.patch_scores(payload, normal), head.patch_scores(payload, anomalous)])
    return auroc(np.r_[np.zeros(500), np.ones(500)], scores.numpy())


@pytest.mark.parametrize("clustering", ["sinkhorn", "kmeans"])
def test_merged_bank_of_two_halves_scores_like_the_centralized_bank(split, clustering):
    data, halves, normal, anomalous = split
    head = MemoryBankHead(HeadSettings(num_prototypes=12, bank_clustering=clustering), DIM)
    central = head.fit_local(data)
    merged = head.merge([head.fit_local(half) for half in halves])
    assert merged.arrays["prototypes"].shape == (12, DIM) and merged.count == 2000
    probe = torch.cat([normal, anomalous])
    a, b = head.patch_scores(central, probe), head.patch_scores(merged, probe)
    assert ((a - b).abs().mean() / a.mean()) < SCORE_TOLERANCE
    assert abs(separation(head, central, normal, anomalous)
               - separation(head, merged, normal, anomalous)) < AUROC_TOLERANCE


def test_bank_refinement_is_the_centralized_lloyd_step(split):
    data, halves, *_ = split
    head = MemoryBankHead(HeadSettings(num_prototypes=12), DIM)
    start = head.merge([head.fit_local(half) for half in halves])
    federated = head.refine(start, [head.refine_local(start, h) for h in halves])
    central = head.refine(start, [head.refine_local(start, data)])
    np.testing.assert_allclose(federated.arrays["prototypes"], central.arrays["prototypes"],
                               rtol=1e-5, atol=1e-5)


def test_federated_em_step_equals_the_centralized_em_step(split):
    data, halves, *_ = split
    head = GaussianMixtureHead(HeadSettings(gmm_components=6), DIM)
    start = head.merge([head.fit_local(half) for half in halves])
    federated = head.refine(start, [head.refine_local(start, h) for h in halves])
    central = head.refine(start, [head.refine_local(start, data)])
    for key in ("weights", "means", "covariances"):
        np.testing.assert_allclose(federated.arrays[key], central.arrays[key], rtol=1e-6,
                                   atol=1e-8)


def test_moment_merged_mixture_scores_like_the_centralized_mixture(split):
    data, halves, normal, anomalous = split
    head = GaussianMixtureHead(HeadSettings(gmm_components=6), DIM)
    central = head.fit_local(data)
    merged = head.merge([head.fit_local(half) for half in halves])
    assert np.isclose(merged.arrays["weights"].sum(), 1.0)
    assert abs(separation(head, central, normal, anomalous)
               - separation(head, merged, normal, anomalous)) < AUROC_TOLERANCE


def test_flow_merge_pools_moments_exactly_and_averages_weights(split):
    data, halves, normal, anomalous = split
    settings = dataclasses.replace(HeadSettings(), flow_blocks=2, flow_hidden=32, flow_epochs=3)
    head = FlowHead(settings, DIM)
    local = [head.fit_local(half) for half in halves]
    merged = head.merge(local)
    np.testing.assert_allclose(merged.arrays["mean"], data.mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(merged.arrays["std"], data.std(0).numpy(), rtol=1e-3)
    key = "couplings.0.net.0.weight"
    np.testing.assert_allclose(merged.arrays[key],
                               (local[0].arrays[key] + local[1].arrays[key]) / 2, atol=1e-6)
    refined = head.refine(merged, [head.refine_local(merged, h) for h in halves])
    assert separation(head, refined, normal, anomalous) > 0.8
