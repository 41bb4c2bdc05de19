"""Placing a defective image over a normal one: cross-correlation alignment (objects) and
random shifts (textures), both as integer (dy, dx) translations."""

from __future__ import annotations

import numpy as np
from skimage.feature import match_template

Shift = tuple[int, int]


def to_gray(image: np.ndarray) -> np.ndarray:
    """float64 [H, W] luminance (ITU-R 601) of ``image`` [H, W, 3]."""
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def estimate_shift(reference: np.ndarray, moving: np.ndarray, crop_fraction: float) -> Shift:
    """The translation that puts ``moving`` onto ``reference`` (both [H, W] gray).

    A centre crop of ``moving`` (side ``crop_fraction`` of the image) is searched in
    ``reference`` by normalised cross-correlation; the best match's offset from the crop's own
    position is the shift: ``shift_image(moving, shift)`` lies over ``reference``. Shifts
    are bounded by the margin around the crop, (1 - crop_fraction) / 2 of each side.
    """
    if reference.shape != moving.shape or reference.ndim != 2:
        raise ValueError(f"reference {reference.shape} and moving {moving.shape}: need same [H, W]")
    height, width = moving.shape
    crop_h = max(1, round(height * crop_fraction))
    crop_w = max(1, round(width * crop_fraction))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    template = moving[top : top + crop_h, left : left + crop_w]
    if np.ptp(template) == 0:  # a flat crop correlates equally everywhere
        return 0, 0
    scores = match_template(reference, template)
    best_row, best_col = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(best_row) - top, int(best_col) - left


def shift_image(image: np.ndarray, shift: Shift, *, fill: str) -> np.ndarray:
    """``image`` [H, W, ...] translated by integer ``shift`` (dy, dx); the uncovered border is
    ``fill``-ed: "edge" repeats the nearest pixel (images), "zero" writes 0 (masks)."""
    dy, dx = shift
    height, width = image.shape[:2]
    if abs(dy) >= height or abs(dx) >= width:
        raise ValueError(f"shift {shift} moves a {height}x{width} image out of the frame")
    pad = [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))]
    pad += [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge" if fill == "edge" else "constant")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[top : top + height, left : left + width]


def clamp_shift(mask: np.ndarray, shift: Shift) -> Shift:
    """``shift`` limited so that every pixel of ``mask`` [H, W] stays inside the frame."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return shift
    height, width = mask.shape
    dy = int(np.clip(shift[0], -rows.min(), height - 1 - rows.max()))
    dx = int(np.clip(shift[1], -cols.min(), width - 1 - cols.max()))
    return dy, dx


def random_shift(mask: np.ndarray, max_fraction: float, rng: np.random.Generator) -> Shift:
    """A random (dy, dx), uniform over the shifts of at most ``max_fraction`` of each side that
    keep ``mask`` [H, W] inside the frame (the paper's random x/y shift for textures); drawing
    within the allowed range, not clamping, so defects do not pile up at the borders."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("random_shift: empty mask")
    shift = []
    for positions, side in ((rows, mask.shape[0]), (cols, mask.shape[1])):
        reach = round(side * max_fraction)
        low, high = max(-positions.min(), -reach), min(side - 1 - positions.max(), reach)
        shift.append(int(rng.integers(low, high + 1)))
    return shift[0], shift[1]
