"""Federated whitening: pooled site moments equal the centralized ones, whitened normal features
have an identity covariance (up to the shrinkage), and what crosses is checked."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedad.heads.payload import PayloadError, check_moments, payload_from_record
from fedad.heads.whitening import SHRINKAGE, Whitening, feature_moments

DIM = 6


def correlated_features(n: int, seed: int) -> torch.Tensor:
    """[n, DIM] features with very unequal, correlated channels."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(99))
    scales = torch.tensor([30.0, 10.0, 3.0, 1.0, 0.3, 0.1])
    return (torch.randn(n, DIM, generator=generator) * scales) @ mixing + 5.0


def test_two_sites_moments_give_the_centralized_whitening():
    a, b = correlated_features(300, 0), correlated_features(500, 1)
    federated = Whitening.from_moments([feature_moments(a), feature_moments(b)])
    central = Whitening.from_moments([feature_moments(torch.cat([a, b]))])
    np.testing.assert_allclose(federated.mean, central.mean, rtol=1e-5)
    np.testing.assert_allclose(federated.matrix, central.matrix, rtol=1e-4, atol=1e-6)


def test_whitened_normal_features_have_unit_covariance_up_to_the_shrinkage():
    features = correlated_features(4000, 0)
    whitened = Whitening.from_moments([feature_moments(features)]).apply(features).double()
    assert whitened.mean(0).abs().max() < 1e-3
    # each direction of variance v ends at v / (v + s), s = SHRINKAGE * mean variance
    variances = torch.linalg.eigvalsh(torch.cov(features.double().T) * 3999 / 4000)
    shrink = SHRINKAGE * variances.mean()
    expected = variances / (variances + shrink)
    got = torch.linalg.eigvalsh(torch.cov(whitened.T) * 3999 / 4000)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    assert expected.max() > 0.99  # the large directions are truly whitened


def test_whitening_refuses_features_of_another_width_or_rank():
    whitening = Whitening.from_moments([feature_moments(correlated_features(200, 0))])
    with pytest.raises(ValueError, match="width 6"):
        whitening.apply(torch.randn(5, DIM + 1))
    with pytest.raises(ValueError, match=r"\[2, 6, 3, 4\]"):
        whitening.apply(torch.randn(2, DIM, 3, 4))


def test_the_whitening_a_message_carries_is_checked():
    whitening = Whitening.from_moments([feature_moments(correlated_features(200, 0))])
    got = Whitening.from_content(whitening.add_to(RecordDict()), DIM)
    np.testing.assert_array_equal(got.matrix, whitening.matrix)
    assert Whitening.from_content(RecordDict(), DIM) is None
    with pytest.raises(PayloadError, match="mean shape"):
        Whitening.from_content(whitening.add_to(RecordDict()), DIM + 1)
    broken = Whitening(whitening.mean, whitening.matrix.copy())
    broken.matrix[0, 0] = np.nan
    with pytest.raises(PayloadError, match="non-finite"):
        Whitening.from_content(broken.add_to(RecordDict()), DIM)


def test_feature_moments_payloads_are_typed_and_checked():
    sent = feature_moments(correlated_features(50, 0))
    got = payload_from_record(sent.to_record(), "feature-moments", {"D": DIM})
    assert got.count == 50 and set(got.arrays) == {"mean", "second"}
    with pytest.raises(PayloadError, match="shape"):
        payload_from_record(sent.to_record(), "feature-moments", {"D": DIM + 2})
    with pytest.raises(ValueError, match="finite"):
        feature_moments(torch.full((3, DIM), float("inf")))


def test_moments_that_are_no_covariance_are_refused():
    good = feature_moments(correlated_features(100, 0))
    check_moments(good)
    for name, change in (("negative variance", lambda m: m - 10 * np.abs(m).max() * np.eye(DIM)),
                         ("not symmetric", lambda m: m + np.triu(np.ones((DIM, DIM)), 1))):
        bad = type(good)(good.kind, {**good.arrays, "second": change(good.arrays["second"])},
                         good.count)
        with pytest.raises(PayloadError, match=name):
            check_moments(bad)
