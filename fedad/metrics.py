"""Anomaly-detection metrics (numpy in, float out), with fedad's fixed metric names.

Image level: AUROC, AP, F1-max over image scores. Pixel level: the same over all pixels, and
AUPRO, the per-region overlap integrated up to 30 % FPR and normalised (MVTec AD's definition,
as in its reference code and anomalib). Undefined values (one class only) are NaN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

METRIC_NAMES = (
    "image_auroc", "pixel_auroc", "image_ap", "pixel_ap",
    "image_f1_max", "pixel_f1_max", "aupro", "class_accuracy",
)


def _two_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < labels.sum() < labels.size


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; labels [N] {0,1}, scores [N]. NaN with a single class."""
    labels = np.asarray(labels).ravel() > 0
    if not _two_classes(labels):
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the PR curve, step-wise); NaN without positives."""
    labels = np.asarray(labels).ravel() > 0
    if not labels.any():
        return float("nan")
    return float(average_precision_score(labels, np.asarray(scores).ravel()))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds; NaN without positives."""
    labels = np.asarray(labels).ravel() > 0
    if not labels.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Args:
        masks: [N, H, W] ground truth {0, 1}.
        maps: [N, H, W] anomaly scores.
        fpr_limit: upper FPR bound of the integral (0.3 in MVTec AD).
    Returns:
        area / fpr_limit in [0, 1]; NaN without defect regions or normal pixels.

    Regions are the 8-connected components of each ground-truth mask. For a threshold t,
    PRO(t) is the mean over all regions of the fraction of the region with score >= t, and
    FPR(t) the fraction of all normal pixels with score >= t. Computed with one sort over all
    pixels: each pixel contributes 1/(|region| * #regions) to PRO or 1/#normal to FPR.
    """
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    _check_same_shape(masks, maps, "masks", "maps", ndim=3)
    structure = np.ones((3, 3), dtype=int)
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        region_ids[i] = np.where(labelled > 0, labelled + num_regions, 0)
        num_regions += count
    normal = ~masks
    num_normal = int(normal.sum())
    if num_regions == 0 or num_normal == 0:
        return float("nan")
    region_sizes = np.bincount(region_ids.ravel(), minlength=num_regions + 1).astype(np.float64)
    weights_pro = np.where(normal, 0.0, 1.0 / (region_sizes[region_ids] * num_regions))
    weights_fpr = np.where(normal, 1.0 / num_normal, 0.0)

    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(weights_fpr.ravel()[order])
    pro = np.cumsum(weights_pro.ravel()[order])
    # keep the last point of each run of equal scores: thresholds sit between distinct values
    last = np.r_[scores[1:] != scores[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    if cut < len(fpr):
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y0
        fpr = np.r_[fpr[:cut], fpr_limit]
        pro = np.r_[pro[:cut], pro_at_limit]
    area = np.trapezoid(pro, fpr)
    return float(np.clip(area / fpr_limit, 0.0, 1.0))


def class_accuracy(true_classes: np.ndarray, predicted_classes: np.ndarray) -> float:
    """Share of samples whose predicted defect class equals the true one; NaN when empty."""
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
    """
    labels, image_scores = np.asarray(labels), np.asarray(image_scores)
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_same_shape(labels, image_scores, "labels", "image_scores", ndim=1)
    _check_same_shape(masks, maps, "masks", "maps", ndim=3)
    if len(labels) != len(masks):
        raise ValueError(f"labels has {len(labels)} images but masks has {len(masks)}")
    for name, values in (("image_scores", image_scores), ("maps", maps)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or Inf")
    pixel_labels, pixel_scores = masks.ravel() > 0, maps.ravel()
    return {
        "image_auroc": auroc(labels, image_scores),
        "pixel_auroc": auroc(pixel_labels, pixel_scores),
        "image_ap": average_precision(labels, image_scores),
        "pixel_ap": average_precision(pixel_labels, pixel_scores),
        "image_f1_max": f1_max(labels, image_scores),
        "pixel_f1_max": f1_max(pixel_labels, pixel_scores),
        "aupro": aupro(masks, maps),
    }


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str,
                      ndim: int | None = None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name_a} must have {ndim} dimensions, got shape {a.shape}")
