"""Anomaly maps and their baseline: the mean map of normal images, pooled across sites,
subtracted before the image score."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from sklearn.metrics import roc_auc_score

from fedad.config import ExperimentConfig
from fedad.heads.base import FeatureHead
from fedad.heads.memory_bank import MemoryBankHead
from fedad.heads.payload import PayloadError, attach_arrays, attached_arrays, payload_from_record
from fedad.heads.scoring import (
    STORAGE_DTYPE,
    PatchSet,
    ScoreScale,
    anomaly_maps,
    border_distance,
    map_baseline,
    normal_map,
)
from fedad.heads.settings import HeadSettings
from fedad.heads.whitening import Whitening, feature_moments
from fedad.heads.workflow import evaluate_head
from fedad.metrics import defect_type_table

SIZE = 16


class FirstChannelHead(FeatureHead):
    """A head whose patch score is the feature's first channel (maps are what we draw)."""

    fit_kind = refine_kind = "prototypes"
    num_units = 1

    def fit_local(self, features): ...
    def merge(self, payloads): ...
    def refine_local(self, head, features): ...
    def refine(self, head, payloads): ...

    def patch_scores(self, head, features):
        return features[:, 0]


def drawn_maps(count: int, bump: tuple[int, int] | None, seed: int) -> torch.Tensor:
    """Features [N, 1, S, S] of images whose score is noise plus a hot frame (as the backbone's
    padded border patches give) and, if ``bump``, a weaker interior defect."""
    generator = torch.Generator().manual_seed(seed)
    scores = 0.1 * torch.rand(count, 1, SIZE, SIZE, generator=generator)
    scores[..., torch.from_numpy(border_distance(SIZE) < 2)] += 1.0
    if bump is not None:
        scores[..., bump[0], bump[1]] += 0.6
    return scores


def test_the_baseline_lets_an_interior_defect_outscore_the_hot_border():
    head = FirstChannelHead(HeadSettings(), 1)
    normals, defective = drawn_maps(8, None, 0), drawn_maps(4, (8, 6), 1)
    fit_maps = anomaly_maps(head, None, drawn_maps(20, None, 2), SIZE, sigma=0)
    baseline = map_baseline([normal_map(fit_maps[:12]), normal_map(fit_maps[12:])])
    labels = np.r_[np.zeros(8), np.ones(4)]

    def image_scores(base):
        maps = anomaly_maps(head, None, torch.cat([normals, defective]), SIZE, 0, base)
        return maps.reshape(len(maps), -1).max(1)

    raw, corrected = image_scores(None), image_scores(baseline)
    assert raw[labels == 1].min() < raw[labels == 0].max()  # the border rules the raw maximum
    assert corrected[labels == 1].min() > corrected[labels == 0].max()
    maps = anomaly_maps(head, None, defective, SIZE, 0, baseline)
    assert all(np.unravel_index(m.argmax(), m.shape) == (8, 6) for m in maps)


def test_the_baseline_is_the_frames_excess_in_the_pooled_normal_maps():
    rng = np.random.default_rng(0)
    rings = border_distance(SIZE)
    frame = np.clip(3.0 - rings, 0, None)  # the artefact: 3, 2, 1 at the three outer rings
    maps = (0.01 * rng.random((10, SIZE, SIZE)) + frame).astype(np.float32)
    maps[:, 4:6, 6:9] += 5.0  # where a part usually lies: not a property of the frame
    pooled = map_baseline([normal_map(maps[:3]), normal_map(maps[3:])])
    mean = maps.mean(0)
    level = mean[rings == 3].mean()
    for distance in range(3):  # the excess over the profile's lowest level before it rises
        ring = rings == distance
        np.testing.assert_allclose(pooled[ring], mean[ring].mean() - level, rtol=1e-4)
    assert np.all(pooled[rings >= 3] == 0)  # nothing is subtracted further in, the part neither
    np.testing.assert_allclose(pooled[rings < 3], frame[rings < 3], atol=0.02)
    with pytest.raises(ValueError, match="baseline"):
        anomaly_maps(FirstChannelHead(HeadSettings(), 1), None, drawn_maps(2, None, 0),
                     SIZE, 0, pooled[:-1])


def test_normal_map_payloads_and_the_sent_baseline_are_checked():
    sent = normal_map(np.ones((3, SIZE, SIZE), np.float32))
    assert sent.count == 3 and sent.arrays["mean"].shape == (SIZE, SIZE)
    got = payload_from_record(sent.to_record(), "normal-map", {"S": SIZE})
    np.testing.assert_array_equal(got.arrays["mean"], sent.arrays["mean"])
    with pytest.raises(PayloadError, match="shape"):
        payload_from_record(sent.to_record(), "normal-map", {"S": SIZE + 1})
    with pytest.raises(ValueError, match="finite"):
        normal_map(np.full((2, SIZE, SIZE), np.nan, np.float32))
    content = attach_arrays(RecordDict(), "map-baseline", {"mean": sent.arrays["mean"]})
    assert attached_arrays(content, "map-baseline", {"mean": (SIZE, SIZE)}) is not None
    assert attached_arrays(RecordDict(), "map-baseline", {"mean": (SIZE, SIZE)}) is None
    with pytest.raises(PayloadError, match="mean shape"):
        attached_arrays(content, "map-baseline", {"mean": (SIZE, SIZE + 1)})
    bad = attach_arrays(RecordDict(), "map-baseline",
                        {"mean": np.full((SIZE, SIZE), np.inf, np.float32)})
    with pytest.raises(PayloadError, match="non-finite"):
        attached_arrays(bad, "map-baseline", {"mean": (SIZE, SIZE)})



def test_metrics_rank_raw_scores_when_the_calibration_saturates():
    image_size = 2 * SIZE  # a config's image size is a multiple of 32
    normals, defective = drawn_maps(6, None, 0), drawn_maps(6, (8, 6), 1)
    defective[:3, :, 8, 6] -= 0.5  # three faint defects: some ranked below normal images
    labels = np.r_[np.zeros(6), np.ones(6)].astype(int)
    masks = np.zeros((12, image_size, image_size), bool)
    masks[6:, 16:18, 12:14] = True
    test = PatchSet(torch.cat([normals, defective]), labels, labels, masks,
                    np.zeros((12, image_size, image_size, 3), np.float32))
    cfg = ExperimentConfig.from_run_config({"image-size": image_size, "map-sigma": 0.0,
                                            "map-baseline": False})
    saturated = ScoreScale(image_threshold=-1e6, image_scale=1e-3, pixel_threshold=-1e6,
                           pixel_scale=1e-3)
    head = FirstChannelHead(HeadSettings(), 1)
    metrics, predictions = evaluate_head(head, None, test, saturated, cfg)
    assert np.all(predictions.image_scores == 1.0)  # every calibrated score ties at 1
    raw = anomaly_maps(head, None, test.features, image_size, 0).reshape(12, -1).max(1)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, raw))
    assert 0.5 < metrics["image_auroc"] < 1.0
    # the per-type table and the saved ROC rank the same raw scores, not the ties
    assert np.array_equal(predictions.ranked(), raw)
    rows = defect_type_table(labels, labels, predictions.image_scores, ("good", "defect"),
                             ranking_scores=predictions.ranked())
    assert rows[1]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert rows[1]["flagged"] == 1.0  # the share flagged still reads the calibrated threshold


def test_maps_are_scored_a_few_images_at_a_time_and_in_order(monkeypatch):
    class RecordingHead(FirstChannelHead):
        def patch_scores(self, head, features):
            seen.append(len(features))
            return super().patch_scores(head, features)

    features = drawn_maps(5, (8, 6), 0)
    seen: list[int] = []
    whole = anomaly_maps(RecordingHead(HeadSettings(), 1), None, features, SIZE, sigma=1)
    assert seen == [5 * SIZE * SIZE]
    monkeypatch.setattr("fedad.heads.scoring.PATCHES_PER_CHUNK", 2 * SIZE * SIZE + 1)
    seen.clear()
    chunked = anomaly_maps(RecordingHead(HeadSettings(), 1), None, features, SIZE, sigma=1)
    assert seen == [2 * SIZE * SIZE, 2 * SIZE * SIZE, SIZE * SIZE]
    np.testing.assert_array_equal(chunked, whole)


def test_a_subsample_of_patches_is_the_same_rows_as_from_the_full_flattening():
    features = torch.randn(3, 5, 4, 6)
    patches = PatchSet(features, np.zeros(3), np.zeros(3), np.zeros((3, 8, 8)),
                       np.zeros((3, 8, 8, 3)))
    full = features.permute(0, 2, 3, 1).reshape(-1, 5)
    assert patches.num_patches == 72 and torch.equal(patches.flat(), full)
    rows = torch.randperm(72, generator=torch.Generator().manual_seed(7))[:10]
    assert torch.equal(patches.flat(10, seed=7), full[rows])
    assert torch.equal(patches.flat(72, seed=7), full)  # no subsample at the limit


def test_maps_whitened_chunk_by_chunk_equal_maps_of_the_whitened_set(monkeypatch):
    features = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    flat = features.permute(0, 2, 3, 1).reshape(-1, 3)
    whitening = Whitening.from_moments([feature_moments(flat)])
    whitened = whitening.apply(flat).reshape(5, SIZE, SIZE, 3).permute(0, 3, 1, 2)
    head = FirstChannelHead(HeadSettings(), 3)
    monkeypatch.setattr("fedad.heads.scoring.PATCHES_PER_CHUNK", 2 * SIZE * SIZE)
    chunked = anomaly_maps(head, None, features, SIZE, 1, whitening=whitening)
    whole = anomaly_maps(head, None, whitened, SIZE, 1)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(chunked, anomaly_maps(head, None, features, SIZE, 1))


def test_patch_sets_hold_half_precision_and_heads_score_in_float32():
    generator = torch.Generator().manual_seed(2)
    features = 3 * torch.rand(6, 8, SIZE, SIZE, generator=generator)
    stored = PatchSet(features.to(STORAGE_DTYPE), *(np.zeros((6, *s)) for s in
                                                    ((), (), (SIZE, SIZE), (SIZE, SIZE, 3))))
    assert stored.features.element_size() == 2
    assert stored.flat().dtype == stored.flat(50, seed=0).dtype == torch.float32
    settings = HeadSettings(num_prototypes=20)
    head = MemoryBankHead(settings, 8, seed=0)
    payload = head.fit_local(features.permute(0, 2, 3, 1).reshape(-1, 8))
    full = anomaly_maps(head, payload, features, SIZE, 1)
    half = anomaly_maps(head, payload, stored.features, SIZE, 1)
    # float16 keeps 11 significant bits: the maps move by a small fraction of their spread
    assert np.abs(half - full).max() < 0.01 * full.std()
    assert np.corrcoef(half.ravel(), full.ravel())[0, 1] > 0.9999
