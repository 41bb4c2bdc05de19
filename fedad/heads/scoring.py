"""From patch features to anomaly maps, image scores and calibrated [0, 1] predictions.

Patch scores [N, h, w] are upsampled bilinearly to the image size and smoothed with a Gaussian
(NexViTAD §3.2, PatchCore). With ``map-baseline`` (default) the border artefact is subtracted:
how much more a normal image scores near the image edge than further in (from the sites' mean
normal map, :func:`map_baseline`). Without it the image border, whose patches the backbone
sees through padding, holds the maximum of almost every normal map, and the image score
measures the border rather than the defect. The image score is the map's maximum or the mean
of its top-k pixels. Raw scores are mapped to [0, 1] by a logistic around a threshold
estimated from normal images the sites hold (mean + 3 std of their scores), so that 0.5 is the
decision threshold, as :class:`fedad.train.predictions.Predictions` requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedad.data import AnomalyDataset, Sample
from fedad.device import autocast, model_device, to_device
from fedad.heads.base import FeatureHead
from fedad.heads.features import PatchFeatureExtractor
from fedad.heads.payload import Payload
from fedad.heads.settings import HeadSettings
from fedad.heads.whitening import Whitening, whiten
from fedad.models.anomaly_map import smooth_maps

THRESHOLD_STDS = 3.0
RISE_TOLERANCE = 0.01
BASELINE_RECORD = "map-baseline"  # the array record that carries the baseline to the sites
PATCHES_PER_CHUNK = 1 << 16
"""Patches a head scores at once in :func:`anomaly_maps` (bounds its intermediate arrays: a
full-covariance GMM holds [patches, components, D] in float64)."""
EXTRACTION_BATCH = 4
"""Images per backbone pass in :func:`extract_patches`: at feature-scales 2 and 224 px the
backbone sees 512 px images, whose first activations are 32 MB each per image."""
STORAGE_DTYPE = torch.float16
"""How a :class:`PatchSet` holds its features: half the memory of a site's normal set (10 MB
per image at 224 px with the default levels); heads and whitening compute in float32."""


@dataclass
class PatchSet:
    """Patch features of a set of images and what evaluation needs besides."""

    features: torch.Tensor  # [N, D, h, w], STORAGE_DTYPE from extract_patches
    labels: np.ndarray  # [N]
    defect_classes: np.ndarray  # [N]
    masks: np.ndarray  # [N, H, W]
    images: np.ndarray  # [N, H, W, 3]

    @staticmethod
    def bytes_for(num_images: int, dim: int, grid: tuple[int, int], image_size: int) -> int:
        """Bytes a site's set of ``num_images`` holds: features [N, D, h, w] in STORAGE_DTYPE,
        images [N, S, S, 3], masks and one anomaly map [N, S, S] each in float32."""
        per_image = dim * grid[0] * grid[1] * STORAGE_DTYPE.itemsize + 5 * 4 * image_size**2
        return num_images * per_image

    @property
    def num_patches(self) -> int:
        """N * h * w."""
        n, _, h, w = self.features.shape
        return n * h * w

    def flat(self, limit: int | None = None, seed: int = 0) -> torch.Tensor:
        """All patch features as float32 [N * h * w, D] (row order image, y, x), or a seeded
        subsample of ``limit`` of those rows, gathered without copying the others."""
        _, d, h, w = self.features.shape
        if limit is None or self.num_patches <= limit:
            return self.features.permute(0, 2, 3, 1).reshape(-1, d).float()
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(self.num_patches, generator=generator)[:limit]
        return self.features.flatten(2)[rows // (h * w), :, rows % (h * w)].float()


def extract_patches(extractor: PatchFeatureExtractor, samples: Sequence[Sample],
                    image_size: int, defect_types: Sequence[str] | None = None,
                    batch_size: int = EXTRACTION_BATCH, precision: str = "32") -> PatchSet:
    """Patch features [N, D, h, w] (:data:`STORAGE_DTYPE`, on the CPU) of ``samples`` at
    ``image_size`` (and labels, masks, images), written batch by batch into arrays allocated
    once: the set holds :meth:`PatchSet.bytes_for` and extraction adds only one batch's
    activations. Each batch of ``batch_size`` images goes through the extractor on its device,
    under ``precision``'s autocast."""
    if not samples:
        raise ValueError("extract_patches: no samples")
    device = model_device(extractor)
    dataset = AnomalyDataset(samples, image_size, defect_types=defect_types, cache=False)
    n = len(dataset)
    labels, classes = np.empty(n, np.int64), np.empty(n, np.int64)
    masks = np.empty((n, image_size, image_size), np.float32)
    images = np.empty((n, image_size, image_size, 3), np.float32)
    features: torch.Tensor | None = None
    start = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast(device, precision):
            part = extractor(to_device(batch["image"], device))
        if features is None:
            features = torch.empty((n, *part.shape[1:]), dtype=STORAGE_DTYPE)
        stop = start + len(part)
        features[start:stop] = part.to("cpu", STORAGE_DTYPE)
        labels[start:stop] = batch["label"].numpy()
        classes[start:stop] = batch["defect_class"].numpy()
        masks[start:stop] = batch["mask"][:, 0].numpy()
        images[start:stop] = batch["image"].permute(0, 2, 3, 1).numpy()
        start = stop
    assert features is not None and start == n
    return PatchSet(features, labels, classes, masks, images)


def anomaly_maps(head: FeatureHead, payload: Payload, features: torch.Tensor, image_size: int,
                 sigma: float, baseline: np.ndarray | None = None,
                 whitening: Whitening | None = None) -> np.ndarray:
    """Anomaly maps [N, H, W]: patch scores of features [N, D, h, w] under ``payload`` (a few
    images at a time, :data:`PATCHES_PER_CHUNK`, each chunk moved to the head's device, in
    float32 and whitened by ``whitening`` if given, so that no float32 or whitened copy of the
    whole set is made), upsampled bilinearly to ``image_size``, Gaussian-smoothed with
    ``sigma`` pixels, minus ``baseline`` [H, W] when given (:func:`map_baseline`)."""
    n, d, h, w = features.shape

    def chunk_scores(chunk: torch.Tensor) -> torch.Tensor:
        flat = to_device(chunk, head.device).permute(0, 2, 3, 1).reshape(-1, d).float()
        return head.patch_scores(payload, whiten(flat, whitening)).cpu()

    scores = torch.cat([chunk_scores(chunk)
                        for chunk in features.split(max(1, PATCHES_PER_CHUNK // (h * w)))])
    patch_maps = scores.reshape(n, 1, h, w).float()
    maps = F.interpolate(patch_maps, size=(image_size, image_size), mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    maps = smooth_maps(maps, sigma)
    if not np.isfinite(maps).all():
        raise FloatingPointError(f"{type(head).__name__}: non-finite anomaly maps")
    return less_baseline(maps, baseline)


def less_baseline(maps: np.ndarray, baseline: np.ndarray | None) -> np.ndarray:
    """Maps [N, H, W] minus ``baseline`` [H, W] (:func:`map_baseline`), or as they are
    without one."""
    if baseline is None:
        return maps
    if baseline.shape != maps.shape[1:]:
        raise ValueError(f"map baseline {list(baseline.shape)} for maps {list(maps.shape[1:])}")
    return maps - baseline


def normal_map(maps: np.ndarray) -> Payload:
    """A site's ``normal-map`` payload: the mean [S, S] of the raw anomaly maps [N, S, S] of its
    normal images, count N."""
    if maps.ndim != 3 or not len(maps) or not np.isfinite(maps).all():
        raise ValueError(f"normal_map: expected finite [N, S, S] maps, got {list(maps.shape)}")
    return Payload("normal-map", {"mean": maps.mean(0, dtype=np.float64).astype(np.float32)},
                   len(maps))


def border_distance(size: int) -> np.ndarray:
    """Int [S, S]: each pixel's distance in pixels to the nearest edge of the image."""
    index = np.arange(size)
    edge = np.minimum(index, size - 1 - index)
    return np.minimum(edge[:, None], edge[None, :])


def map_baseline(payloads: Sequence[Payload]) -> np.ndarray:
    """The baseline [S, S] that :func:`anomaly_maps` subtracts: the border artefact of the sites'
    normal maps. Their mean (weighted by image counts) is averaged over each ring of pixels at
    the same distance from the image edge. Going inwards, this profile falls until its first
    rise (by more than RISE_TOLERANCE of its range, so that noise on a plateau is not one); the
    rings outside the lowest point before that rise get their excess over it, the others zero.
    Only the frame's excess is removed: the rest of the mean map (where a part usually lies)
    would lower the scores of defects there."""
    if not payloads:
        raise ValueError("map_baseline: no normal-map payloads")
    counts = np.array([p.count for p in payloads], np.float64)
    means = np.stack([p.arrays["mean"] for p in payloads]).astype(np.float64)
    pooled = np.tensordot(counts / counts.sum(), means, axes=1)
    rings = border_distance(len(pooled))
    profile = np.bincount(rings.ravel(), pooled.ravel()) / np.bincount(rings.ravel())
    tolerance = RISE_TOLERANCE * np.ptp(profile)
    rises = np.flatnonzero(profile > np.minimum.accumulate(profile) + tolerance)
    end = int(np.argmin(profile[:rises[0]] if len(rises) else profile))
    excess = np.where(np.arange(len(profile)) < end, profile - profile[end], 0.0)
    return excess[rings].astype(np.float32)


def image_scores(maps: np.ndarray, settings: HeadSettings) -> np.ndarray:
    """Image scores [N] of maps [N, H, W]: the maximum, or the mean of the top-k fraction."""
    flat = maps.reshape(len(maps), -1)
    if settings.image_score == "max":
        return flat.max(1)
    k = max(1, round(settings.topk_fraction * flat.shape[1]))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


@dataclass(frozen=True)
class ScoreScale:
    """Logistic calibration of raw image scores and map values: sigmoid((v - threshold) / scale)."""

    image_threshold: float
    image_scale: float
    pixel_threshold: float
    pixel_scale: float

    @classmethod
    def from_moments(cls, moments: Sequence[dict[str, float]]) -> ScoreScale:
        """Pool the sites' score moments (``count``, ``image_mean``, ``image_var``,
        ``pixel_mean``, ``pixel_var``) and put each threshold at mean + 3 std."""
        counts = np.array([m["count"] for m in moments], np.float64)
        values = {}
        for level in ("image", "pixel"):
            means = np.array([m[f"{level}_mean"] for m in moments])
            second = np.array([m[f"{level}_var"] for m in moments]) + means**2
            mean = counts @ means / counts.sum()
            std = float(np.sqrt(max(counts @ second / counts.sum() - mean**2, 1e-12)))
            values[f"{level}_threshold"] = float(mean + THRESHOLD_STDS * std)
            values[f"{level}_scale"] = std
        return cls(**values)

    def apply(self, maps: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(maps [N, H, W], scores [N]) raw -> calibrated, in (0, 1), 0.5 at the threshold."""
        def squash(values: np.ndarray, threshold: float, scale: float) -> np.ndarray:
            return 1 / (1 + np.exp(-np.clip((values - threshold) / scale, -50, 50)))
        return (squash(maps, self.pixel_threshold, self.pixel_scale).astype(np.float32),
                squash(scores, self.image_threshold, self.image_scale))


def score_moments(maps: np.ndarray, settings: HeadSettings,
                  baseline: np.ndarray | None = None) -> dict[str, float]:
    """Moments of normal images' raw maps [N, H, W] (less ``baseline`` [H, W] if given) and of
    their image scores, for calibration."""
    maps = less_baseline(maps, baseline)
    scores = image_scores(maps, settings)
    return {"count": float(len(scores)), "image_mean": float(scores.mean()),
            "image_var": float(scores.var()), "pixel_mean": float(maps.mean()),
            "pixel_var": float(maps.var())}
