"""On-the-fly synthetic anomalies: masks are exact, binary and deterministic by seed."""

import numpy as np
import pytest
import torch

from fedad.train.synthetic_anomalies import AnomalySynthesizer, perlin_noise


def _images(n=8, size=64):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=gen)


@pytest.mark.parametrize("extent", ["large", "small"])
def test_masks_are_binary_and_mark_exactly_the_changed_pixels(extent):
    images = _images()
    out, masks = AnomalySynthesizer(probability=1.0, seed=3, extent=extent)(images)
    assert out.shape == images.shape and masks.shape == (8, 1, 64, 64)
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    changed = (out - images).abs().amax(1, keepdim=True) > 0
    assert not changed[masks == 0].any(), "pixels outside the mask changed"
    assert (masks.flatten(1).sum(1) > 0).all(), "probability=1 must corrupt every image"
    assert out.min() >= 0 and out.max() <= 1


def test_probability_zero_leaves_images_untouched():
    images = _images()
    out, masks = AnomalySynthesizer(probability=0.0, seed=3)(images)
    assert torch.equal(out, images) and masks.sum() == 0


def test_deterministic_by_seed():
    images = _images()
    a = AnomalySynthesizer(0.5, seed=1)(images)
    b = AnomalySynthesizer(0.5, seed=1)(images)
    c = AnomalySynthesizer(0.5, seed=2)(images)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_perlin_noise_shape_and_range():
    noise = perlin_noise(64, 4, np.random.default_rng(0))
    assert noise.shape == (64, 64) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.5 and noise.std() > 0.05


def test_small_extent_makes_much_smaller_anomalies_than_large():
    images = _images(n=32, size=128)
    large = AnomalySynthesizer(1.0, seed=0, extent="large")(images)[1].flatten(1).sum(1)
    small = AnomalySynthesizer(1.0, seed=0, extent="small")(images)[1].flatten(1).sum(1)
    assert (small > 0).all()
    # the small extent's Perlin discs have radius <= 6 % of the side, its scars <= 2 % wide
    assert small.max() <= np.pi * (0.06 * 128) ** 2 + 1
    assert small.median() * 5 < large.median()


def test_unknown_extent_is_refused_by_name():
    with pytest.raises(ValueError, match="extent='huge'"):
        AnomalySynthesizer(extent="huge")
