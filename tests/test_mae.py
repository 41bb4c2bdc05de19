"""MAE-DyT: block masking, visible-only encoding, SSIM against scikit-image, thresholds; the
anomaly map from complementary masked passes and the feature-space error."""

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.experiment import prepare_data
from fedad.inprocess import run_in_process
from fedad.mae.model import MaskedAutoencoder, block_mask
from fedad.mae.scoring import (
    anomaly_error,
    complementary_masks,
    error_extractor,
    feature_error,
    inference_masks,
    masked_reconstruction,
)
from fedad.mae.settings import MAESettings
from fedad.mae.training import (
    MAE_RECIPE,
    map_sigma,
    reconstruction_errors,
    split_holdout,
    threshold_f1,
    to_unit_interval,
)
from fedad.models import create_model
from fedad.models.dyt import DyT
from fedad.train.ssim import ssim

TINY = {"mae-patch-size": 8, "mae-embed-dim": 32, "mae-depth": 1, "mae-heads": 2,
        "mae-decoder-dim": 16, "mae-decoder-depth": 1, "mae-decoder-heads": 2,
        "mae-pretrain-rounds": 1}


def tiny_mae(norm: str = "dyt") -> MaskedAutoencoder:
    return create_model("mae", image_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                        decoder_dim=16, decoder_depth=1, decoder_heads=2, norm=norm)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_block_mask_hides_exact_fraction_in_contiguous_blocks(ratio):
    masks = block_mask(16, 8, ratio, torch.Generator().manual_seed(0))
    assert masks.shape == (16, 64) and masks.dtype == torch.bool
    assert (masks.sum(1) == round(ratio * 64)).all()
    assert len({tuple(m.tolist()) for m in masks}) == 16  # a fresh mask per image
    # blocks, not scattered patches: most hidden patches have a hidden 4-neighbour
    grid = masks.view(16, 8, 8)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:] |= grid[:, :-1]
    neighbour[:, :-1] |= grid[:, 1:]
    neighbour[:, :, 1:] |= grid[:, :, :-1]
    neighbour[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & neighbour).sum() / grid.sum() > 0.9


def test_masking_in_training_only_and_encoder_sees_visible_patches_only():
    torch.manual_seed(0)
    model = tiny_mae()
    images = torch.rand(2, 3, 64, 64)
    model.train()
    out = model(images, generator=torch.Generator().manual_seed(3))
    assert (out.mask.sum(1) == 48).all()  # 75 % of 8 x 8 patches
    # pixels under hidden patches cannot change the output: the encoder never saw them
    hidden = out.mask.view(2, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2)
    changed = torch.where(hidden[:, None], torch.rand(2, 3, 64, 64), images)
    again = model(changed, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.reconstruction, out.reconstruction)
    model.eval()
    full = model(images)
    assert not full.mask.any() and full.embedding.shape == (2, 32)
    assert not torch.allclose(model(changed).reconstruction, full.reconstruction)
    assert full.reconstruction.min() >= 0 and full.reconstruction.max() <= 1


def test_norm_switch_replaces_every_norm():
    def norms(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())
    dyt, layernorm = tiny_mae("dyt"), tiny_mae("layernorm")
    assert norms(dyt, torch.nn.LayerNorm) == 0 and norms(dyt, DyT) == 2 * 2 + 2
    assert norms(layernorm, DyT) == 0 and norms(layernorm, torch.nn.LayerNorm) == 6


def test_ssim_matches_scikit_image_within_1e_5():
    rng = np.random.default_rng(0)
    x = rng.random((40, 48, 3))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    reference = structural_similarity(x, y, data_range=1.0, channel_axis=2,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    ours = ssim(torch.tensor(x).permute(2, 0, 1)[None], torch.tensor(y).permute(2, 0, 1)[None])
    assert abs(float(ours) - reference) < 1e-5
    same = torch.tensor(x).permute(2, 0, 1)[None]
    assert float(ssim(same, same)) == pytest.approx(1.0)


def test_unit_interval_is_half_at_threshold_and_keeps_order():
    errors = np.array([0.0, 0.01, 0.02, 0.5])
    mapped = to_unit_interval(errors, 0.02)
    assert mapped[2] == 0.5 and (np.diff(mapped) > 0).all() and mapped.max() < 1
    with pytest.raises(ValueError, match="threshold"):
        to_unit_interval(errors, 0.0)


def test_fit_calibrates_thresholds_on_held_out_normals_and_predicts(tmp_path):
    root = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=10,
                            num_test_good=3, num_test_per_defect=2)
    cfg = ExperimentConfig(method="mae", data_path=str(root), category="washer", image_size=64,
                           local_epochs=1, batch_size=4, max_train_batches=2, backbone="none",
                           extra=TINY)
    data = prepare_data(cfg, 1)
    samples = data.samples(0, "train")
    train, holdout = split_holdout(samples, 0.2)
    assert holdout and not {s.image_path for s in train} & {s.image_path for s in holdout}
    assert split_holdout(list(reversed(samples)), 0.2)[1] == holdout  # same every round
    torch.manual_seed(0)
    model = MAE_RECIPE.build(cfg)
    metrics = MAE_RECIPE.fit(model, samples, cfg, seed=0, server_round=1)
    assert metrics["pretraining"] == 1.0 and "train_ssim" in metrics
    assert metrics["num-examples"] == len(train)
    settings = cfg.section(MAESettings)
    assert (settings.mae_inference_passes, settings.mae_error) == (4, "feature")  # defaults
    maps, scores, _ = reconstruction_errors(model, holdout, 64, map_sigma(cfg), passes=4,
                                            error="feature")
    assert float(model.pixel_threshold) == pytest.approx(np.quantile(maps, 0.99), rel=1e-5)
    assert float(model.image_threshold) == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
    finetune = MAE_RECIPE.fit(model, samples, cfg, seed=1, server_round=2)
    assert finetune["pretraining"] == 0.0 and "train_ssim" not in finetune
    test = data.samples(-1, "test")
    predictions = MAE_RECIPE.predict(model, test, cfg, data.defect_types)
    assert predictions.maps.shape == (len(test), 64, 64)
    assert predictions.maps.min() >= 0 and predictions.maps.max() < 1
    f1 = threshold_f1(predictions)
    assert 0 <= f1["image_f1"] <= 1 and 0 <= f1["pixel_f1"] <= 1


def test_bad_settings_name_the_key():
    cfg = ExperimentConfig(method="mae", image_size=64, extra={"mae-norm": "batchnorm"})
    with pytest.raises(ConfigError, match="mae-norm"):
        MAE_RECIPE.build(cfg)
    for key, value in (("mae-error", "ssim"), ("mae-inference-passes", 1),
                       ("mae-inference-passes", -2)):
        with pytest.raises(ConfigError, match=f"{key}={value!r}"):
            ExperimentConfig(method="mae", extra={key: value}).section(MAESettings)
    cfg = ExperimentConfig(method="mae", image_size=64, extra={"mae-patch-size": 24})
    with pytest.raises(ValueError, match="mae-patch-size=24"):
        MAE_RECIPE.build(cfg)


def test_adaptive_aggregation_weighs_mae_sites_by_their_validation_accuracy(tmp_path):
    root = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=12,
                            num_test_good=2, num_test_per_defect=1)
    cfg = ExperimentConfig(
        method="mae", strategy="fedmsvt", data_path=str(root), category="washer",
        image_size=64, num_server_rounds=1, local_epochs=1, batch_size=4, max_train_batches=1,
        backbone="none", val_fraction=0.3, plot_every_round=False,
        results_dir=str(tmp_path / "results"), extra=TINY)
    final = run_in_process(cfg, 2)["final"]
    assert 0 <= final["train_val_pixel_accuracy"] <= 1  # ACA's q_i from the MAE's predictions
    weights = pd.read_csv(tmp_path / "results" / "aggregation_weights.csv")
    assert len(weights) == 2 and weights["weight"].sum() == pytest.approx(1.0)
    assert final["train_pixel_threshold"] > 0


@pytest.mark.parametrize("passes", [2, 4, 5])
def test_complementary_masks_show_every_patch_in_exactly_one_pass(passes):
    masks = complementary_masks(8, passes, seed=1)
    assert masks.shape == (passes, 64) and masks.dtype == torch.bool
    assert ((~masks).sum(0) == 1).all()  # visible once, hidden passes - 1 times
    visible = (~masks).sum(1)
    assert int(visible.max() - visible.min()) <= 1
    assert torch.equal(masks, complementary_masks(8, passes, seed=1))
    with pytest.raises(ValueError, match="mae-inference-passes=1"):
        complementary_masks(8, 1)
    assert inference_masks(8, 0) is None


def test_masked_passes_rebuild_each_patch_from_its_context_only():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    images = torch.rand(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, 16:24, 24:32] = 1.0  # one whole patch, (2, 3)
    with torch.no_grad():
        masks = inference_masks(8, 4)
        masked = [masked_reconstruction(model, x, masks) for x in (images, changed)]
        unmasked = [masked_reconstruction(model, x, None) for x in (images, changed)]
    patch = (slice(None), slice(None), slice(16, 24), slice(24, 32))
    torch.testing.assert_close(masked[0][patch], masked[1][patch], rtol=0, atol=1e-6)
    assert not torch.allclose(masked[0], masked[1])  # it is context for the other patches
    assert not torch.allclose(unmasked[0][patch], unmasked[1][patch])  # the seed's pass copies
    with pytest.raises(ValueError, match="hiding as many patches in every row"):
        model(images.repeat(2, 1, 1, 1), mask=torch.tensor([[True] * 64, [False] * 64]))


def test_feature_error_is_zero_for_a_faithful_copy_and_peaks_at_a_local_change():
    extractor = error_extractor("feature")
    assert error_extractor("pixel") is None
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = feature_error(extractor, images, images.clone())
        rebuilt = images.clone()
        rebuilt[:, :, 40:52, 8:20] = 0.5  # a grey square where the image had texture
        error = feature_error(extractor, images, rebuilt)
    assert same.shape == (2, 64, 64) and same.abs().max() < 1e-4
    assert error[:, 40:52, 8:20].mean() > 3 * error[:, :24, 36:].mean()
    model = tiny_mae().eval()
    with torch.no_grad():
        maps = anomaly_error(model, images, inference_masks(8, 4), extractor)
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and (maps >= -1e-6).all()
