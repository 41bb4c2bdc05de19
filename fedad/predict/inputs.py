"""The images ``fedad predict`` scores: files, folders or an MVTec AD category, read in batches
as the run read its own (:func:`fedad.data.load_image`); an unreadable file is skipped with a
one-line reason."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedad.data import load_image
from fedad.data.images import IMAGE_SUFFIXES, is_image_file

UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
"""What PIL raises for a corrupt, truncated or foreign file."""


class InputError(ValueError):
    """An input path that names no image; the message is one line naming it."""


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; an MVTec category's test images
    (``test/<type>/*``)."""
    folder = folder / "test" if _is_category(folder) else folder
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files ``inputs`` name, in their order, each once: a file as it is, a folder
    its image files (recursively, sorted), an MVTec AD category folder (with ``train/`` and
    ``test/``) its test images. InputError naming a path that does not exist or a folder
    without images."""
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if path.is_dir():
            images = _images_under(path)
            if not images:
                raise InputError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.update(dict.fromkeys(images))
        elif path.is_file():
            found[path] = None
        else:
            raise InputError(f"{path}: no such file or folder")
    if not found:
        raise InputError("no input images given")
    return list(found)


@dataclass
class Batch:
    """Images read for scoring.

    Attributes:
        paths: [B] their files.
        images: [B, 3, S, S] float32 RGB in [0, 1], resized as the run resized its images.
        sizes: [B] (width, height) of each file.
    """

    paths: list[Path]
    images: torch.Tensor
    sizes: list[tuple[int, int]]


def read_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(image [S, S, 3] float32 in [0, 1], (width, height) of the file); the UNREADABLE
    errors of PIL for a file it cannot decode."""
    with Image.open(path) as opened:
        original = opened.size
    return load_image(path, size), original


def read_batches(paths: Sequence[Path], size: int, batch_size: int,
                 skipped: list[str]) -> Iterator[Batch]:
    """``paths`` read in batches of up to ``batch_size`` images at ``size``; each file PIL
    cannot decode is left out and its one-line reason appended to ``skipped``."""
    for start in range(0, len(paths), batch_size):
        good, images, sizes = [], [], []
        for path in paths[start:start + batch_size]:
            try:
                image, original = read_image(path, size)
            except UNREADABLE as err:
                skipped.append(f"{path}: unreadable image ({type(err).__name__})")
                continue
            good.append(path)
            images.append(image)
            sizes.append(original)
        if good:
            # contiguous [B, 3, S, S], as the run's data loader stacks its images: a
            # channels-last view would take other convolution kernels (other last bits)
            batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            yield Batch(good, batch, sizes)
