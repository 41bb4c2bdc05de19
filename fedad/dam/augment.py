"""The Data Augmentation Module, Algorithm 1 of D-ADDA (Coscia et al.): new defective images
and masks made from a site's normal images and its few real defects.

For each new sample:
1. draw a normal image I^N and a defective image I^D with its mask M^D;
2. take I^N's quick shift superpixels (cached per normal image);
3. objects: align I^D (and M^D) to I^N by cross-correlation of I^D's centre crop;
   textures: no alignment; I^D and M^D get a random x/y shift on every try instead;
4. defective superpixels = those overlapping M^D, grown by adjacent ones; the new mask is a
   random target among them plus its nearest ones, a fraction p ~ U(p1, p2) of them, smoothed;
5. I^D's histogram is matched to I^N's (per channel, whole image: compose.py says why) and
   its patch under the new mask is pasted onto I^N;
6. eq. (4): keep it when its mean SSIM to the defective images is at least its mean SSIM to
   the normal images (its own base and source left out, see quality.py); otherwise draw a
   new mask (step 3 shift for textures, step 4), up to ``dam-quality-tries`` times, then
   keep the last try (paper, Sec. IV-A).
Algorithm 1 as printed draws the (I^N, I^D) pair once before its loop; we draw a pair per
new sample, so that the samples do not all share one background and one defect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fedad.dam.alignment import (
    Shift,
    clamp_shift,
    estimate_shift,
    random_shift,
    shift_image,
    to_gray,
)
from fedad.dam.compose import match_colours, paste_patch
from fedad.dam.masks import defective_superpixels, select_nearest, smooth_mask
from fedad.dam.quality import QualityRule
from fedad.dam.settings import KINDS, DAMSettings
from fedad.dam.superpixels import SuperpixelCache

log = logging.getLogger(__name__)

STEPS = ("superpixels", "alignment", "mask_and_paste", "quality")
"""Timed steps of one sample, as in the paper's Table VI."""


@dataclass(frozen=True)
class DAMSample:
    """One generated sample and how it was made.

    image: float32 [H, W, 3] in [0, 1]; mask: uint8 [H, W] in {0, 1}; tries: quality tries
    used (1..dam-quality-tries); passed: whether the kept try passed eq. (4); fraction: the p
    of the kept mask; seconds: wall time per step of :data:`STEPS`.
    """

    image: np.ndarray
    mask: np.ndarray
    normal_index: int
    defect_index: int
    tries: int
    passed: bool
    fraction: float
    seconds: dict[str, float] = field(default_factory=dict)


def _check_inputs(normal: np.ndarray, defect: np.ndarray, masks: np.ndarray) -> None:
    """ValueError naming the argument unless shapes, dtypes, ranges and masks are usable."""
    for name, images in (("normal_images", normal), ("defect_images", defect)):
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"{name}: expected [N>=1, H, W, 3], got {images.shape}")
        if images.dtype.kind != "f" or not np.isfinite(images).all():
            raise ValueError(f"{name}: expected finite floats, got {images.dtype}")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{name}: values outside [0, 1]")
    if normal.shape[1:] != defect.shape[1:]:
        raise ValueError(f"normal_images {normal.shape} and defect_images {defect.shape}: "
                         "image sizes differ")
    if masks.shape != defect.shape[:3]:
        raise ValueError(f"defect_masks {masks.shape}: expected {defect.shape[:3]}")
    if not np.isin(masks, (0, 1)).all():
        raise ValueError("defect_masks: values must be 0 or 1")
    empty = np.flatnonzero(masks.reshape(len(masks), -1).sum(1) == 0)
    if empty.size:
        raise ValueError(f"defect_masks: masks {empty[:5].tolist()} have no defect pixel")


class DefectAugmenter:
    """Algorithm 1 over one site's images of one category (see the module docstring).

    Args:
        normal_images: float32 [N, H, W, 3] in [0, 1].
        defect_images: float32 [M, H, W, 3] in [0, 1].
        defect_masks: [M, H, W] in {0, 1}, one per defect image, none empty.
        kind: "texture" | "object".
        settings: DAMSettings (paper defaults when None).
    """

    def __init__(
        self,
        normal_images: np.ndarray,
        defect_images: np.ndarray,
        defect_masks: np.ndarray,
        *,
        kind: str,
        settings: DAMSettings | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
        _check_inputs(normal_images, defect_images, defect_masks)
        self.kind = kind
        self.settings = settings or DAMSettings()
        self.normal = normal_images.astype(np.float32, copy=False)
        self.defect = defect_images.astype(np.float32, copy=False)
        self.masks = defect_masks.astype(bool)
        s = self.settings
        self._scale = max(normal_images.shape[1:3]) / 128  # dam-smooth-sigma is given at 128
        self.superpixels = SuperpixelCache(
            self.normal, kernel_size=s.dam_quickshift_kernel_size,
            max_dist=s.dam_quickshift_max_dist, ratio=s.dam_quickshift_ratio,
        )
        self.quality = QualityRule(self.defect, self.normal, leave_out=s.dam_quality_leave_out)

    def _alignment(self, normal_index: int, defect_index: int) -> Shift:
        """The object alignment shift of defect image onto normal image (kept in frame)."""
        shift = estimate_shift(
            to_gray(self.normal[normal_index]), to_gray(self.defect[defect_index]),
            self.settings.dam_align_crop,
        )
        return clamp_shift(self.masks[defect_index], shift)

    def sample(self, rng: np.random.Generator) -> DAMSample:
        """Generate one new defective image and its mask."""
        s = self.settings
        seconds = dict.fromkeys(STEPS, 0.0)
        normal_index = int(rng.integers(len(self.normal)))
        defect_index = int(rng.integers(len(self.defect)))
        normal, source, source_mask = (
            self.normal[normal_index], self.defect[defect_index], self.masks[defect_index]
        )
        start = time.perf_counter()
        superpixels = self.superpixels[normal_index]
        seconds["superpixels"] = time.perf_counter() - start

        start = time.perf_counter()
        shift = self._alignment(normal_index, defect_index) if self.kind == "object" else None
        seconds["alignment"] = time.perf_counter() - start

        start = time.perf_counter()
        if s.dam_histogram_match:
            source = match_colours(source, normal)
        seconds["mask_and_paste"] = time.perf_counter() - start
        low, high = s.p_range(self.kind)
        tries, passed = 0, False
        while not passed and tries < s.dam_quality_tries:
            tries += 1
            start = time.perf_counter()
            if self.kind == "texture":
                shift = random_shift(source_mask, s.dam_texture_shift, rng)
            placed = shift_image(source, shift, fill="edge")
            placed_mask = shift_image(source_mask, shift, fill="zero")
            candidates = defective_superpixels(superpixels, placed_mask, s.dam_growth_rings)
            fraction = float(rng.uniform(low, high))
            chosen = select_nearest(superpixels, candidates, fraction, rng)
            mask = smooth_mask(superpixels.to_mask(chosen), s.dam_smooth_sigma * self._scale)
            image = paste_patch(normal, placed, mask)
            middle = time.perf_counter()
            passed = self.quality.passes(image, normal_index, defect_index)
            seconds["mask_and_paste"] += middle - start
            seconds["quality"] += time.perf_counter() - middle
        return DAMSample(
            image=image, mask=mask.astype(np.uint8), normal_index=normal_index,
            defect_index=defect_index, tries=tries, passed=passed, fraction=fraction,
            seconds=seconds,
        )

    def generate(self, count: int, seed: int) -> Iterator[DAMSample]:
        """``count`` samples from a generator seeded with ``seed`` (deterministic); logs
        progress about every 10 s."""
        if count < 0:
            raise ValueError(f"count={count}: must be >= 0")
        rng = np.random.default_rng(seed)
        last_log = time.perf_counter()
        for done in range(1, count + 1):
            yield self.sample(rng)
            if time.perf_counter() - last_log > 10 or done == count:
                log.info("DAM (%s): %d/%d samples", self.kind, done, count)
                last_log = time.perf_counter()


def augment_defects(
    normal_images: np.ndarray,
    defect_images: np.ndarray,
    defect_masks: np.ndarray,
    *,
    count: int,
    kind: str,
    seed: int,
    settings: DAMSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1: ``count`` new defective images with their masks.

    Args:
        normal_images: float32 [N, H, W, 3] in [0, 1].
        defect_images: float32 [M, H, W, 3] in [0, 1] (one defect class, or several).
        defect_masks: [M, H, W] in {0, 1}, none empty.
        count: number of samples to generate.
        kind: "texture" | "object" (see :func:`fedad.dam.category_kind`).
        seed: seed of every random choice; equal seeds give equal outputs.
        settings: DAMSettings (paper defaults when None).
    Returns:
        images float32 [count, H, W, 3] in [0, 1], masks uint8 [count, H, W] in {0, 1}.
    """
    augmenter = DefectAugmenter(
        normal_images, defect_images, defect_masks, kind=kind, settings=settings
    )
    height, width = normal_images.shape[1:3]
    images = np.empty((count, height, width, 3), dtype=np.float32)
    masks = np.empty((count, height, width), dtype=np.uint8)
    for i, sample in enumerate(augmenter.generate(count, seed)):
        images[i], masks[i] = sample.image, sample.mask
    assert np.isfinite(images).all() and images.min(initial=0) >= 0 and images.max(initial=0) <= 1
    return images, masks
