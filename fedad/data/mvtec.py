"""Reader of the MVTec AD folder layout, its validation, and a torch Dataset over its samples.

Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<type>/*`` (type "good"
or a defect name) and ``<root>/<category>/ground_truth/<type>/<stem>_mask.png``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedad.data.images import IMAGE_SUFFIXES, is_image_file, load_image, load_mask

GOOD = "good"


class DatasetError(ValueError):
    """Bad input; the message is one line: '<path>: <problem>'."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset and, for a defect, its mask."""

    category: str
    split: str  # "train" | "test" (the folder on disk)
    defect_type: str  # "good" or the defect folder name
    image_path: Path
    mask_path: Path | None  # None for good images

    @property
    def label(self) -> int:
        """0 for a good image, 1 for a defect."""
        return int(self.defect_type != GOOD)


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under ``root`` that contain ``train/`` and ``test/``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory")
    return sorted(p.name for p in root.iterdir() if _is_category(p))


def _images(folder: Path) -> list[Path]:
    """Sorted image files directly in ``folder`` (none if it does not exist)."""
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _find_mask(category_dir: Path, defect_type: str, image: Path) -> Path:
    """The mask of a defect image, ``ground_truth/<type>/<stem>_mask.<ext>``; raises if none."""
    folder = category_dir / "ground_truth" / defect_type
    for suffix in (".png", *sorted(IMAGE_SUFFIXES - {".png"})):
        for candidate in (folder / f"{image.stem}_mask{suffix}", folder / f"{image.stem}{suffix}"):
            if candidate.is_file():
                return candidate
    expected = folder / f"{image.stem}_mask.png"
    raise DatasetError(f"{image}: defect image without mask (expected {expected})")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; raises DatasetError if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__})") from None


def _check_mask(mask: Path, image: Path) -> None:
    """Raise DatasetError unless ``mask`` decodes, matches the image size and is binary."""
    image_size = _image_size(image)
    try:
        with Image.open(mask) as opened:
            mask_size = opened.size
            values = np.unique(np.asarray(opened.convert("L")))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{mask}: unreadable mask ({type(exc).__name__})") from None
    if mask_size != image_size:
        raise DatasetError(
            f"{mask}: mask size {mask_size[0]}x{mask_size[1]} does not match image size "
            f"{image_size[0]}x{image_size[1]} of {image.name}"
        )
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DatasetError(f"{mask}: non-binary mask (values {shown}; expected 0 and one other)")


def scan_category(root: str | Path, category: str, *, check_content: bool = True) -> list[Sample]:
    """All samples of one category: train/good first, then test by (type, path).

    With ``check_content`` every image header is read (catches corrupt files) and every mask
    decoded (size must match its image; values 0 and one other value). Raises DatasetError
    for a missing category, a defect image without mask, a bad mask, an unreadable image, or
    an empty split (no train/good or no test images).
    """
    category_dir = Path(root) / category
    if not _is_category(category_dir):
        available = ", ".join(list_categories(root)) or "none"
        raise DatasetError(f"{category_dir}: category not found (available: {available})")
    train = _images(category_dir / "train" / GOOD)
    if not train:
        raise DatasetError(f"{category_dir / 'train' / GOOD}: empty split (no training images)")
    samples = [Sample(category, "train", GOOD, path, None) for path in train]
    test_dir = category_dir / "test"
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        kind = type_dir.name
        for path in _images(type_dir):
            mask = None if kind == GOOD else _find_mask(category_dir, kind, path)
            samples.append(Sample(category, "test", kind, path, mask))
    if len(samples) == len(train):
        raise DatasetError(f"{test_dir}: empty split (no test images)")
    if check_content:
        for sample in samples:
            if sample.mask_path is None:
                _image_size(sample.image_path)
            else:
                _check_mask(sample.mask_path, sample.image_path)
    return samples


def validate_dataset(root: str | Path, categories: Sequence[str] | None = None) -> list[str]:
    """Check every category (all found under ``root`` by default) and summarise it.

    Returns one line per category, e.g. ``"bottle: train 209 (good 209) | test 83 (good 20,
    broken 63)"``; raises DatasetError on the first problem.
    """
    names = list_categories(root) if categories is None else list(categories)
    if not names:
        raise DatasetError(f"{root}: no category folders with train/ and test/")
    lines = []
    for category in names:
        samples = scan_category(root, category)
        parts = []
        for split in ("train", "test"):
            counts = Counter(s.defect_type for s in samples if s.split == split)
            types = sorted(counts, key=lambda t: (t != GOOD, t))
            detail = ", ".join(f"{t} {counts[t]}" for t in types)
            parts.append(f"{split} {sum(counts.values())} ({detail})")
        lines.append(f"{category}: {' | '.join(parts)}")
    return lines


class AnomalyDataset(torch.utils.data.Dataset):
    """Images, masks and labels of ``samples`` resized to ``image_size``.

    Items: ``image`` float32 [3, H, W] in [0, 1] (not normalised), ``mask`` float32 [1, H, W]
    in {0, 1}, ``label`` int64 scalar (0 good, 1 defect), ``defect_class`` int64 scalar (index
    into ``defect_types``), ``index`` int.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        defect_types: Sequence[str] | None = None,
        cache: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        found = {s.defect_type for s in self.samples} - {GOOD}
        self.defect_types = [GOOD, *sorted(found)] if defect_types is None else list(defect_types)
        if not self.defect_types or self.defect_types[0] != GOOD:
            raise ValueError(f"defect_types must start with {GOOD!r}: {self.defect_types}")
        unknown = found - set(self.defect_types)
        if unknown:
            raise ValueError(f"defect types {sorted(unknown)} not in {self.defect_types}")
        self._class = {name: i for i, name in enumerate(self.defect_types)}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (image [H, W, 3], mask [H, W]) float32 arrays, cached if enabled."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        arrays = (
            load_image(sample.image_path, self.image_size),
            load_mask(sample.mask_path, self.image_size),
        )
        if self._cache is not None:
            self._cache[index] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image, mask = self._arrays(index)
        sample = self.samples[index]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None].copy()),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "defect_class": torch.tensor(self._class[sample.defect_type], dtype=torch.long),
            "index": index,
        }
