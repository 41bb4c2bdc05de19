"""Data quality assessment of eq. (4): keep a new defective image when its mean SSIM to the
defective images is at least its mean SSIM to the normal images.

Leave-one-out (``dam-quality-leave-out``, default on): the new image is a copy of its base
normal image outside the pasted patch (SSIM ~0.9 to it) and of its source defect inside, so
those two are left out of their means when their set has other images. Taken literally, eq. (4)
includes them, and with a site's few normal images the base image alone decides the rule:
on 20 synthetic normals no try passed in 100 with it, while without it the margins straddle 0.

SSIM is computed on luminance with skimage's defaults (7x7 uniform window, sample covariance,
K1=0.01, K2=0.03, data range 1, border of 3 px left out of the mean), batched over all
reference images with their local statistics computed once.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fedad.dam.alignment import to_gray

WINDOW = 7
_K1, _K2 = 0.01, 0.03


def _local_mean(stack: np.ndarray) -> np.ndarray:
    """7x7 uniform filter over the last two axes of ``stack`` [..., H, W]."""
    size = (1,) * (stack.ndim - 2) + (WINDOW, WINDOW)
    return ndimage.uniform_filter(stack, size=size)


class SSIMReferences:
    """A set of reference images; :meth:`scores` gives a candidate's SSIM to each of them.

    Args:
        images: float [K, H, W, 3] in [0, 1], K >= 1.
    """

    def __init__(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"images: expected [K>=1, H, W, 3], got {images.shape}")
        if min(images.shape[1:3]) < WINDOW:
            raise ValueError(f"images {images.shape[1:3]}: SSIM needs sides >= {WINDOW}")
        self.gray = to_gray(images).astype(np.float32)
        self.mean = _local_mean(self.gray)
        self.var = _local_mean(self.gray**2) - self.mean**2

    def scores(self, image: np.ndarray) -> np.ndarray:
        """float64 [K]: SSIM of ``image`` [H, W, 3] to each reference."""
        gray = to_gray(image).astype(np.float32)
        if gray.shape != self.gray.shape[1:]:
            raise ValueError(f"image {image.shape[:2]} != references {self.gray.shape[1:]}")
        mean = _local_mean(gray)
        var = _local_mean(gray**2) - mean**2
        cov = _local_mean(self.gray * gray) - self.mean * mean
        unbias = WINDOW**2 / (WINDOW**2 - 1)
        c1, c2 = _K1**2, _K2**2
        ssim = ((2 * self.mean * mean + c1) * (2 * unbias * cov + c2)) / (
            (self.mean**2 + mean**2 + c1) * (unbias * (self.var + var) + c2)
        )
        pad = (WINDOW - 1) // 2
        return ssim[:, pad:-pad, pad:-pad].mean(axis=(1, 2), dtype=np.float64)


def _mean_without(scores: np.ndarray, index: int | None) -> float:
    """Mean of ``scores`` leaving out ``index`` (None: nothing; kept when it is the only one)."""
    if index is None or len(scores) == 1:
        return float(scores.mean())
    return float(np.delete(scores, index).mean())


class QualityRule:
    """Eq. (4): mean SSIM to the defective images >= mean SSIM to the normal images.

    Args:
        defect_images, normal_images: float [M, H, W, 3] / [N, H, W, 3] in [0, 1].
        leave_out: leave the new image's own base normal and source defect out of the means.
    """

    def __init__(
        self, defect_images: np.ndarray, normal_images: np.ndarray, *, leave_out: bool = True
    ) -> None:
        self.defective = SSIMReferences(defect_images)
        self.normal = SSIMReferences(normal_images)
        self.leave_out = leave_out

    def margin(self, image: np.ndarray, normal_index: int, defect_index: int) -> float:
        """Mean SSIM of ``image`` [H, W, 3] to the defective minus to the normal images
        (>= 0 passes); ``normal_index`` / ``defect_index`` name its base and source."""
        left_out = (defect_index, normal_index) if self.leave_out else (None, None)
        to_defective = _mean_without(self.defective.scores(image), left_out[0])
        return to_defective - _mean_without(self.normal.scores(image), left_out[1])

    def passes(self, image: np.ndarray, normal_index: int, defect_index: int) -> bool:
        """True when ``image`` lies at least as close to the defective images (eq. (4))."""
        return self.margin(image, normal_index, defect_index) >= 0.0
