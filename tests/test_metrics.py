"""Metrics against independent references: scikit-learn, brute force over thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as label_regions
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from fedad import metrics
from fedad.metrics import (
    METRIC_NAMES,
    anomaly_metrics,
    aupro,
    auroc,
    average_precision,
    class_accuracy,
    defect_type_table,
    f1_max,
)


def _scored_labels(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] and scores [n] correlated with them, rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, np.round(rng.normal(size=n) + labels, 1)


def _blob_masks(seed: int, n: int = 4, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Masks [n, size, size] with 2-3 rectangular blobs each, and noisy maps scoring them higher."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for mask in masks:
        for _ in range(rng.integers(2, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            mask[y:y + h, x:x + w] = 1
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)
    return masks, maps


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """PRO and FPR at every distinct threshold by hand, integrated with the trapezoid rule."""
    regions = [
        (i, labelled == k)
        for i, labelled in enumerate(label_regions(mask, connectivity=2) for mask in masks)
        for k in range(1, labelled.max() + 1)
    ]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    inside = fprs <= fpr_limit
    first_outside = np.flatnonzero(~inside)[0]
    x0, x1 = fprs[first_outside - 1], fprs[first_outside]
    y0, y1 = pros[first_outside - 1], pros[first_outside]
    pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area = np.trapezoid(np.r_[pros[inside], pro_at_limit], np.r_[fprs[inside], fpr_limit])
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_sklearn(seed: int) -> None:
    labels, scores = _scored_labels(seed)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force_over_thresholds(seed: int) -> None:
    labels, scores = _scored_labels(seed, n=200)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1_max(labels, scores) == pytest.approx(best, abs=1e-12)


def test_pixel_metrics_equal_sklearn_on_flattened_pixels() -> None:
    masks, maps = _blob_masks(0, n=6)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    labels[0] = 0  # one image counted as good, so both image classes occur
    result = anomaly_metrics(labels, image_scores, masks, maps)
    pixel_labels, pixel_scores = masks.ravel(), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(pixel_labels, pixel_scores))
    assert result["pixel_ap"] == pytest.approx(
        average_precision_score(pixel_labels, pixel_scores)
    )
    assert result["pixel_f1_max"] == pytest.approx(f1_max(pixel_labels, pixel_scores))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores))
    assert result["aupro"] == pytest.approx(aupro(masks, maps))
    assert set(result) == set(METRIC_NAMES) - {"class_accuracy"}
    assert all(0 <= v <= 1 for v in result.values())


def test_histogram_path_for_many_pixels_is_close_to_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    masks = (rng.random((8, 32, 32)) < 0.1).astype(np.uint8)
    maps = rng.random(masks.shape) + 0.5 * masks
    labels, image_scores = np.array([0, 1] * 4), rng.random(8)
    exact = anomaly_metrics(labels, image_scores, masks, maps)
    monkeypatch.setattr(metrics, "EXACT_PIXEL_LIMIT", 100)
    binned = anomaly_metrics(labels, image_scores, masks, maps)
    pixel_names = ("pixel_auroc", "pixel_ap", "pixel_f1_max")
    for name in pixel_names:
        assert binned[name] == pytest.approx(exact[name], abs=1e-3)
    assert any(binned[name] != exact[name] for name in pixel_names)  # the histogram path ran
    assert binned["image_auroc"] == exact["image_auroc"]


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed: int) -> None:
    masks, maps = _blob_masks(seed)
    assert aupro(masks, maps) == pytest.approx(_brute_force_aupro(masks, maps), abs=1e-3)


def test_aupro_other_fpr_limit_matches_brute_force() -> None:
    masks, maps = _blob_masks(7)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(
        _brute_force_aupro(masks, maps, fpr_limit=0.05), abs=1e-3
    )


def test_aupro_regions_are_8_connected() -> None:
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, :3, :3] = 1  # 9 pixels
    masks[0, 3, 3] = 1  # touches the block only diagonally
    maps = np.zeros(masks.shape)
    maps[0, :3, :3] = 1.0
    # one region of 10 pixels: PRO jumps to 0.9 at FPR 0 (two regions would give 0.5)
    pro = 0.9
    assert aupro(masks, maps) == pytest.approx((2 * pro + 0.3 * (1 - pro)) / 2)


def test_aupro_perfect_and_inverted_maps() -> None:
    masks, _ = _blob_masks(1)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-9)


def test_degenerate_inputs_give_nan() -> None:
    assert np.isnan(auroc(np.ones(5), np.arange(5)))
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))
    assert np.isnan(average_precision(np.zeros(5), np.arange(5)))
    assert np.isnan(f1_max(np.zeros(5), np.arange(5)))
    assert np.isnan(aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))
    assert np.isnan(aupro(np.ones((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))
    assert np.isnan(class_accuracy(np.array([]), np.array([])))
    result = anomaly_metrics(np.zeros(2), np.arange(2.0), np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    assert all(np.isnan(v) for v in result.values())


def test_class_accuracy() -> None:
    assert class_accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="true_classes has shape"):
        class_accuracy(np.arange(3), np.arange(4))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(3), np.zeros(4), np.zeros((3, 4, 4)), np.zeros((3, 4, 4))),
         r"labels has shape \(3,\) but image_scores has shape \(4,\)"),
        ((np.zeros(3), np.zeros(3), np.zeros((3, 4, 4)), np.zeros((3, 4, 5))),
         r"masks has shape \(3, 4, 4\) but maps has shape \(3, 4, 5\)"),
        ((np.zeros(2), np.zeros(2), np.zeros((3, 4, 4)), np.zeros((3, 4, 4))),
         "labels has 2 images but masks has 3"),
        ((np.zeros(3), np.zeros(3), np.zeros((3, 16)), np.zeros((3, 16))),
         "masks must have 3 dimensions"),
        ((np.zeros(3), np.array([0.0, np.nan, 1.0]), np.zeros((3, 4, 4)), np.zeros((3, 4, 4))),
         "image_scores contains NaN or Inf"),
        ((np.zeros(3), np.zeros(3), np.zeros((3, 4, 4)), np.full((3, 4, 4), np.inf)),
         "maps contains NaN or Inf"),
    ],
)
def test_anomaly_metrics_rejects_bad_inputs(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        anomaly_metrics(*args)


def test_aupro_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="maps contains NaN"):
        aupro(np.ones((1, 2, 2)), np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0.0)


def test_defect_type_table_scores_each_type_against_the_good_images():
    rng = np.random.default_rng(0)
    types = ("good", "crack", "stain", "hole")
    classes = np.repeat([0, 1, 2], [20, 10, 10])  # no "hole" images: no row for it
    labels = (classes > 0).astype(int)
    scores = np.where(classes == 1, rng.uniform(0.6, 1.0, 40),  # cracks: all above the goods
                      rng.uniform(0.0, 0.55, 40))  # stains: mixed in with the goods
    rows = {r["defect_type"]: r for r in defect_type_table(labels, classes, scores, types)}
    assert set(rows) == {"good", "crack", "stain"}
    assert [rows[t]["images"] for t in ("good", "crack", "stain")] == [20, 10, 10]
    assert rows["crack"]["image_auroc"] == 1.0 and rows["crack"]["flagged"] == 1.0
    stain = classes == 2
    versus = stain | (classes == 0)
    assert rows["stain"]["image_auroc"] == pytest.approx(roc_auc_score(stain[versus],
                                                                       scores[versus]))
    assert rows["good"]["flagged"] == pytest.approx((scores[classes == 0] >= 0.5).mean())
    assert np.isnan(rows["good"]["image_auroc"])
    with pytest.raises(ValueError, match="defect class 3"):
        defect_type_table(labels, np.where(classes == 2, 3, classes), scores, types[:3])
