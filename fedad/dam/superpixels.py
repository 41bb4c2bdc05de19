"""Quick shift superpixels of a normal image, with the adjacency and centroids DAM needs.

Quick shift (Vedaldi & Soatto, ECCV 2008) costs ~0.1 s per 128x128 image here, so a
:class:`SuperpixelCache` computes each normal image's map once per DAM run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import quickshift


@dataclass(frozen=True)
class SuperpixelMap:
    """A label map and its region graph.

    labels: int32 [H, W], labels 0..K-1, every label present;
    centroids: float64 [K, 2] (row, col) of each superpixel;
    adjacency: bool [K, K], True where two superpixels share an edge (4-neighbourhood).
    """

    labels: np.ndarray
    centroids: np.ndarray
    adjacency: np.ndarray

    @property
    def count(self) -> int:
        """Number of superpixels K."""
        return len(self.centroids)

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> SuperpixelMap:
        """Build from any integer label map [H, W] (labels are renumbered to 0..K-1)."""
        if labels.ndim != 2 or labels.dtype.kind not in "iu":
            raise ValueError(f"labels: expected an integer [H, W] map, got {labels.dtype} "
                             f"{labels.shape}")
        _, dense = np.unique(labels, return_inverse=True)
        dense = dense.reshape(labels.shape).astype(np.int32)
        count = int(dense.max()) + 1
        index = np.arange(count)
        rows, cols = np.indices(dense.shape)
        centroids = np.stack(
            [ndimage.mean(rows, dense, index), ndimage.mean(cols, dense, index)], axis=1
        )
        adjacency = np.zeros((count, count), dtype=bool)
        for a, b in ((dense[1:, :], dense[:-1, :]), (dense[:, 1:], dense[:, :-1])):
            differ = a != b
            adjacency[a[differ], b[differ]] = True
        adjacency |= adjacency.T
        return cls(dense, centroids, adjacency)

    def overlapping(self, mask: np.ndarray) -> np.ndarray:
        """bool [K]: superpixels with at least one pixel in ``mask`` [H, W] (the paper's dot
        product of mask and superpixels)."""
        if mask.shape != self.labels.shape:
            raise ValueError(f"mask {mask.shape} != superpixel map {self.labels.shape}")
        hits = np.bincount(self.labels[mask > 0], minlength=self.count)
        return hits > 0

    def grow(self, selected: np.ndarray, rings: int) -> np.ndarray:
        """bool [K]: ``selected`` plus ``rings`` rings of adjacent superpixels."""
        grown = selected.copy()
        for _ in range(rings):
            grown = grown | self.adjacency[grown].any(axis=0)
        return grown

    def to_mask(self, selected: np.ndarray) -> np.ndarray:
        """bool [H, W]: pixels of the selected superpixels (``selected`` bool [K])."""
        return selected[self.labels]


def extract_superpixels(
    image: np.ndarray, *, kernel_size: float, max_dist: float, ratio: float
) -> SuperpixelMap:
    """Quick shift in Lab colour space of ``image`` float [H, W, 3] in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected [H, W, 3], got {image.shape}")
    labels = quickshift(
        image.astype(np.float64), ratio=ratio, kernel_size=kernel_size, max_dist=max_dist,
        convert2lab=True, rng=0,
    )
    return SuperpixelMap.from_labels(labels)


class SuperpixelCache:
    """Superpixel maps of a fixed set of normal images, each computed on first use."""

    def __init__(
        self, images: np.ndarray, *, kernel_size: float, max_dist: float, ratio: float
    ) -> None:
        self.images = images
        self._params = {"kernel_size": kernel_size, "max_dist": max_dist, "ratio": ratio}
        self._maps: dict[int, SuperpixelMap] = {}

    def __getitem__(self, index: int) -> SuperpixelMap:
        if index not in self._maps:
            self._maps[index] = extract_superpixels(self.images[index], **self._params)
        return self._maps[index]
