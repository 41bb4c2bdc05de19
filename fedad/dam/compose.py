"""Pasting a defective patch onto a normal image (MATCHPATCHHISTOGRAMS and REPLACEPATCH)."""

from __future__ import annotations

import numpy as np
from skimage.exposure import match_histograms


def match_colours(defective: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: ``defective`` with each channel's histogram matched to ``normal``'s.

    The mapping is learned on the whole images, not on the patch alone: a patch that is mostly
    defect would otherwise be mapped onto normal colours, which erases the defect (a dark hole
    in a brick came out brick-coloured). Over the whole image the defect is a small share, so
    the mapping corrects lighting and colour, and the defect keeps its rank order (a dark hole
    stays among the darkest pixels). Both inputs float [H, W, 3] in [0, 1].
    """
    if defective.shape != normal.shape or defective.ndim != 3:
        raise ValueError(f"defective {defective.shape}, normal {normal.shape}: need [H, W, 3]")
    matched = match_histograms(defective, normal, channel_axis=-1)
    return np.clip(matched, 0.0, 1.0).astype(np.float32)


def paste_patch(normal: np.ndarray, defective: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: ``normal`` with the pixels of ``mask`` [H, W] taken from
    ``defective`` (both float [H, W, 3] in [0, 1])."""
    if normal.shape != defective.shape or normal.shape[:2] != mask.shape:
        raise ValueError(
            f"normal {normal.shape}, defective {defective.shape}, mask {mask.shape}: "
            "need images [H, W, 3] and mask [H, W] of one size"
        )
    return np.where(mask.astype(bool)[..., None], defective, normal).astype(np.float32)
