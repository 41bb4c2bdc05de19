"""Decoding and resizing of dataset images and defect masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def is_image_file(path: Path) -> bool:
    """True for a visible file with one of IMAGE_SUFFIXES (any case)."""
    visible = not path.name.startswith(".")
    return visible and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float gray images rescaled to 8-bit "L"; other modes unchanged."""
    if image.mode not in _HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = 1.0 if image.mode == "F" else 65535.0
    return Image.fromarray(np.round(np.clip(values / peak, 0, 1) * 255).astype(np.uint8))


def load_image(path: Path, size: int) -> np.ndarray:
    """Float32 [size, size, 3] RGB in [0, 1]: any gray/RGB(A)/palette image, antialiased
    bilinear resize."""
    with Image.open(path) as image:
        rgb = _to_8bit(image).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255


def load_mask(path: Path | None, size: int) -> np.ndarray:
    """Float32 [size, size] in {0, 1}: nearest-neighbour resize, then pixels above half the
    mask's maximum value; all zeros when ``path`` is None (a good image)."""
    if path is None:
        return np.zeros((size, size), dtype=np.float32)
    with Image.open(path) as mask:
        gray = _to_8bit(mask).convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.NEAREST)
    values = np.asarray(gray, dtype=np.float32)
    return (values > 0.5 * max(values.max(), 1.0)).astype(np.float32)
