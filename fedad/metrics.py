"""Anomaly-detection metrics (numpy in, float out), with fedad's fixed metric names.

Image level: AUROC, AP, F1-max over image scores. Pixel level: the same over all pixels, and
AUPRO, the per-region overlap integrated up to 30 % FPR and normalised (MVTec AD's definition,
as in its reference code and anomalib). Undefined values (one class only) are NaN.

AUROC, AP and F1-max all come from one threshold sweep (:class:`_Sweep`): cumulative true and
false positives with the threshold lowered from the highest score, one point per distinct score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

METRIC_NAMES = (
    "image_auroc", "pixel_auroc", "image_ap", "pixel_ap",
    "image_f1_max", "pixel_f1_max", "aupro", "class_accuracy",
)
EXACT_PIXEL_LIMIT = 4_000_000  # above this many pixels, pixel AUROC/AP/F1 use a histogram
HISTOGRAM_BINS = 10_000


@dataclass(frozen=True)
class _Sweep:
    """Cumulative true/false positives [K+1] for thresholds from +inf down to the lowest score."""

    tp: np.ndarray
    fp: np.ndarray

    @property
    def positives(self) -> float:
        return float(self.tp[-1])

    @property
    def negatives(self) -> float:
        return float(self.fp[-1])


def _sweep(labels: np.ndarray, scores: np.ndarray, bins: int | None = None) -> _Sweep:
    """Threshold sweep of labels [M] {0,1} and scores [M].

    Exact with ``bins=None`` (one point per distinct score, one sort); otherwise one point per
    bin of a ``bins``-bin histogram of the scores between their min and max (linear time).
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    _check_same_shape(labels, scores, "labels", "scores")
    _check_finite(scores, "scores")
    labels, scores = labels.ravel() > 0, scores.ravel()
    if bins is None:
        order = np.argsort(-scores, kind="stable")
        sorted_scores, positive = scores[order], labels[order]
        last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
        tp, fp = np.cumsum(positive)[last_of_run], np.cumsum(~positive)[last_of_run]
    else:
        low, high = (scores.min(), scores.max()) if scores.size else (0.0, 0.0)
        scaled = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
        bin_ids = np.minimum((scaled * bins).astype(np.int64), bins - 1)
        tp = np.cumsum(np.bincount(bin_ids[labels], minlength=bins)[::-1])
        fp = np.cumsum(np.bincount(bin_ids[~labels], minlength=bins)[::-1])
    return _Sweep(np.r_[0, tp].astype(np.float64), np.r_[0, fp].astype(np.float64))


def _roc_area(sweep: _Sweep) -> float:
    if sweep.positives == 0 or sweep.negatives == 0:
        return float("nan")
    return float(np.trapezoid(sweep.tp / sweep.positives, sweep.fp / sweep.negatives))


def _average_precision(sweep: _Sweep) -> float:
    if sweep.positives == 0:
        return float("nan")
    recall_gain = np.diff(sweep.tp) / sweep.positives
    predicted = sweep.tp[1:] + sweep.fp[1:]
    precision = np.divide(sweep.tp[1:], predicted, out=np.zeros_like(predicted),
                          where=predicted > 0)
    return float(np.sum(recall_gain * precision))


def _f1(sweep: _Sweep) -> np.ndarray:
    """F1 [K+1] at each threshold of the sweep: 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)."""
    return 2 * sweep.tp / (sweep.tp + sweep.fp + sweep.positives)


def _f1_max(sweep: _Sweep) -> float:
    if sweep.positives == 0:
        return float("nan")
    return float(np.max(_f1(sweep)))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; labels [N] {0,1}, scores [N]. NaN with a single class."""
    return _roc_area(_sweep(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, sum over thresholds of recall gain x precision (as scikit-learn);
    labels [N] {0,1}, scores [N]. NaN without positives."""
    return _average_precision(_sweep(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds of the PR curve; labels [N] {0,1}, scores [N].
    NaN without positives."""
    return _f1_max(_sweep(labels, scores))


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold t, F1) of the best F1 of the decisions score >= t, t among the distinct
    scores; labels [N] {0,1}, scores [N]. (NaN, NaN) without positives."""
    sweep = _sweep(labels, scores)
    if sweep.positives == 0:
        return float("nan"), float("nan")
    # the exact sweep's points: +inf, then each distinct score from the highest down
    thresholds = np.r_[np.inf, np.unique(np.asarray(scores, dtype=np.float64))[::-1]]
    f1 = _f1(sweep)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids [N, H, W] of the 8-connected ground-truth regions, unique over all images (0 =
    normal), and their number."""
    structure = np.ones((3, 3), dtype=int)
    ids = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled, found = ndimage.label(mask, structure=structure)
        ids[i] = np.where(labelled > 0, labelled + count, 0)
        count += found
    return ids, count


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Args:
        masks: [N, H, W] ground truth {0, 1}.
        maps: [N, H, W] anomaly scores.
        fpr_limit: upper FPR bound of the integral (0.3 in MVTec AD), in (0, 1].
    Returns:
        area / fpr_limit in [0, 1]; NaN without defect regions or normal pixels.

    Regions are the 8-connected components of each ground-truth mask. For a threshold t,
    PRO(t) is the mean over all regions of the fraction of the region with score >= t, and
    FPR(t) the fraction of all normal pixels with score >= t. Computed with one sort over all
    pixels: each pixel contributes 1/(|region| * #regions) to PRO or 1/#normal to FPR; the
    curve is interpolated linearly at ``fpr_limit``.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    _check_same_shape(masks, maps, "masks", "maps", ndim=3)
    _check_finite(maps, "maps")
    region_ids, num_regions = _region_ids(masks)
    normal = ~masks
    num_normal = int(normal.sum())
    if num_regions == 0 or num_normal == 0:
        return float("nan")
    region_sizes = np.bincount(region_ids.ravel(), minlength=num_regions + 1).astype(np.float64)
    weights_pro = np.where(normal, 0.0, 1.0 / (region_sizes[region_ids] * num_regions)).ravel()
    weights_fpr = normal.ravel() / num_normal

    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]  # thresholds between distinct scores
    fpr = np.r_[0.0, np.cumsum(weights_fpr[order])[last_of_run]]
    pro = np.r_[0.0, np.cumsum(weights_pro[order])[last_of_run]]
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[cut - 1] <= limit
    if cut < len(fpr):
        pro_at_limit = np.interp(fpr_limit, fpr[cut - 1: cut + 1], pro[cut - 1: cut + 1])
        fpr, pro = np.r_[fpr[:cut], fpr_limit], np.r_[pro[:cut], pro_at_limit]
    area = np.trapezoid(pro, fpr)
    return float(np.clip(area / fpr_limit, 0.0, 1.0))


def class_accuracy(true_classes: np.ndarray, predicted_classes: np.ndarray) -> float:
    """Share of samples [N] whose predicted defect class equals the true one [N]; NaN when empty."""
    true_classes = np.asarray(true_classes).ravel()
    predicted_classes = np.asarray(predicted_classes).ravel()
    _check_same_shape(true_classes, predicted_classes, "true_classes", "predicted_classes")
    if true_classes.size == 0:
        return float("nan")
    return float((true_classes == predicted_classes).mean())


def anomaly_metrics(
    labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray
) -> dict[str, float]:
    """The seven detection metrics of a test split.

    Args:
        labels: [N] {0,1} image labels.
        image_scores: [N] image anomaly scores.
        masks: [N, H, W] {0,1} ground truth.
        maps: [N, H, W] anomaly maps.
    Returns:
        dict with image_auroc, pixel_auroc, image_ap, pixel_ap, image_f1_max, pixel_f1_max, aupro.
        Pixel metrics use all pixels: exact up to :data:`EXACT_PIXEL_LIMIT` pixels, above it
        pixel AUROC/AP/F1-max come from a :data:`HISTOGRAM_BINS`-bin histogram of the map
        values (AUPRO stays exact).
    Raises:
        ValueError: mismatched shapes, or NaN/Inf in any input.
    """
    labels, image_scores = np.asarray(labels), np.asarray(image_scores)
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_same_shape(labels, image_scores, "labels", "image_scores", ndim=1)
    _check_same_shape(masks, maps, "masks", "maps", ndim=3)
    if len(labels) != len(masks):
        raise ValueError(f"labels has {len(labels)} images but masks has {len(masks)}")
    for values, name in ((labels, "labels"), (image_scores, "image_scores"), (masks, "masks"),
                         (maps, "maps")):
        _check_finite(values, name)
    image = _sweep(labels, image_scores)
    pixel = _sweep(masks, maps, bins=HISTOGRAM_BINS if maps.size > EXACT_PIXEL_LIMIT else None)
    return {
        "image_auroc": _roc_area(image),
        "pixel_auroc": _roc_area(pixel),
        "image_ap": _average_precision(image),
        "pixel_ap": _average_precision(pixel),
        "image_f1_max": _f1_max(image),
        "pixel_f1_max": _f1_max(pixel),
        "aupro": aupro(masks, maps),
    }


def defect_type_table(labels: np.ndarray, defect_classes: np.ndarray, image_scores: np.ndarray,
                      defect_types: Sequence[str], threshold: float = 0.5,
                      ranking_scores: np.ndarray | None = None) -> list[dict]:
    """Image-level results per defect type: which kinds of defect a detector finds.

    Args:
        labels: [N] {0,1}; defect_classes: [N] indices into ``defect_types`` (0 = "good");
        image_scores: [N] calibrated scores, ``threshold`` being the decision threshold.
        ranking_scores: [N] the scores the AUROC ranks (default ``image_scores``), e.g. the
            uncalibrated ones where the calibration saturates.
    Returns:
        one row per type present: ``defect_type``, ``images``, ``flagged`` (share of its images
        scored >= threshold: the false-positive rate for "good", the recall for a defect) and
        ``image_auroc`` (that type's images against all good images; NaN for "good" or when
        there are no good images).
    """
    labels, image_scores = np.asarray(labels), np.asarray(image_scores)
    defect_classes = np.asarray(defect_classes)
    _check_same_shape(labels, image_scores, "labels", "image_scores", ndim=1)
    _check_same_shape(labels, defect_classes, "labels", "defect_classes", ndim=1)
    _check_finite(image_scores, "image_scores")
    ranking = image_scores
    if ranking_scores is not None:
        ranking = np.asarray(ranking_scores)
        _check_same_shape(labels, ranking, "labels", "ranking_scores", ndim=1)
        _check_finite(ranking, "ranking_scores")
    good = labels == 0
    rows = []
    for index in np.unique(defect_classes):
        if not 0 <= index < len(defect_types):
            raise ValueError(f"defect class {index} not among {len(defect_types)} defect types")
        members = defect_classes == index
        versus = members | good
        rows.append({
            "defect_type": defect_types[index], "images": int(members.sum()),
            "flagged": float((image_scores[members] >= threshold).mean()),
            "image_auroc": auroc(labels[versus], ranking[versus]) if index else float("nan"),
        })
    return rows


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str,
                      ndim: int | None = None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name_a} must have {ndim} dimensions, got shape {a.shape}")


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
        raise ValueError(f"{name} contains NaN or Inf")
