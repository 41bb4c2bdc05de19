"""Built-in generator of MVTec-format anomaly-detection data, and its shared on-disk cache.

Every image is rendered from its own generator seeded by (seed, category, split, type, index),
so the output is byte-identical for a seed and independent of generation order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from fedad.data import textures
from fedad.data.defects import OBJECT_DEFECTS, TEXTURE_DEFECTS, Defect
from fedad.data.mvtec import DatasetError
from fedad.data.parts import PART_STYLES, render_part
from fedad.data.scene import Camera, Scene

GENERATOR_VERSION = 1
MIN_DEFECT_PIXELS_AT_128 = 6  # scaled linearly with the image size (defects are mostly thin)
MAX_ATTEMPTS = 20


def _texture_scene(
    render: Callable[[np.random.Generator, int], np.ndarray],
) -> Callable[[np.random.Generator, int], Scene]:
    """Wrap a texture renderer ``(rng, size) -> [S, S, 3]`` into a scene renderer."""
    return lambda rng, size: Scene(render(rng, size))


SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "brick": _texture_scene(textures.brick),
    "fabric": _texture_scene(textures.fabric),
    "wood": _texture_scene(textures.wood),
    **{name: partial(render_part, style) for name, style in PART_STYLES.items()},
}
SYNTHETIC_CATEGORIES: dict[str, str] = {
    name: "object" if name in PART_STYLES else "texture" for name in SCENES
}
DEFAULT_CATEGORY = "brick"
NOISE_STD = {"texture": (0.005, 0.02), "object": (0.008, 0.025)}


def defect_types(category: str) -> list[str]:
    """Sorted defect type names (without "good") of a synthetic category."""
    return sorted(_defects(category))


def _defects(category: str) -> dict[str, Defect]:
    return OBJECT_DEFECTS if SYNTHETIC_CATEGORIES[category] == "object" else TEXTURE_DEFECTS


def sample_rng(
    seed: int, category: str, split: str, defect_type: str, index: int
) -> np.random.Generator:
    """The numpy Generator of one image, seeded from its identity (stable across runs)."""
    key = zlib.crc32(f"{category}/{split}/{defect_type}".encode())
    return np.random.default_rng([seed, key, index])


def render_sample(
    category: str, defect_type: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image of ``category`` with a ``defect_type`` defect ("good": none).

    Returns:
        clean: uint8 [S, S, 3], the same photo without the defect;
        image: uint8 [S, S, 3];
        mask: bool [S, S], exactly the pixels where ``image`` differs from ``clean``
        (at least MIN_DEFECT_PIXELS_AT_128 * S / 128, and 2, of them for a defect; all False
        for "good").
    """
    kind = SYNTHETIC_CATEGORIES[category]
    min_pixels = max(2, round(MIN_DEFECT_PIXELS_AT_128 * size / 128))
    for _ in range(MAX_ATTEMPTS):
        scene = SCENES[category](rng, size)
        camera = Camera.random(rng, size, NOISE_STD[kind])
        clean = camera.shoot(scene.compose())
        if defect_type == "good":
            return clean, clean, np.zeros((size, size), bool)
        image = camera.shoot(_defects(category)[defect_type](scene, rng))
        mask = (image != clean).any(axis=-1)
        if mask.sum() >= min_pixels:
            return clean, image, mask
    raise RuntimeError(f"{category}/{defect_type}: no visible defect in {MAX_ATTEMPTS} tries")


def _write_split(
    folder: Path, category: str, split: str, defect_type: str, count: int, seed: int, size: int
) -> None:
    """Write ``count`` images (and masks for defects) of one MVTec split folder."""
    images = folder / category / split / defect_type
    images.mkdir(parents=True, exist_ok=True)
    masks = folder / category / "ground_truth" / defect_type
    for index in range(count):
        rng = sample_rng(seed, category, split, defect_type, index)
        _, image, mask = render_sample(category, defect_type, rng, size)
        Image.fromarray(image).save(images / f"{index:03d}.png")
        if defect_type != "good":
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{index:03d}_mask.png")


def generate_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    num_train: int = 60,
    num_test_good: int = 20,
    num_test_per_defect: int = 12,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write a synthetic dataset in the MVTec AD layout under ``out`` and return ``out``.

    Images are RGB PNGs [image_size, image_size]; masks are 0/255 gray PNGs named
    ``<stem>_mask.png``. ``categories`` defaults to all of SYNTHETIC_CATEGORIES.
    """
    names = list(SYNTHETIC_CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in names if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        raise DatasetError(
            f"{', '.join(unknown)}: unknown synthetic category "
            f"(available: {', '.join(SYNTHETIC_CATEGORIES)})"
        )
    root = Path(out)
    for category in names:
        write = partial(_write_split, root, category, seed=seed, size=image_size)
        write("train", "good", num_train)
        write("test", "good", num_test_good)
        for defect in defect_types(category):
            write("test", defect, num_test_per_defect)
    return root


def default_cache_root() -> Path:
    """``$FEDAD_CACHE``, else ``~/.cache/fedad``."""
    return Path(os.environ.get("FEDAD_CACHE") or Path.home() / ".cache" / "fedad").expanduser()


def ensure_synthetic(
    cache_root: str | Path | None = None, *, seed: int = 0, image_size: int = 128
) -> Path:
    """Root of the default synthetic dataset for (seed, image_size), generated on first use.

    Lives in ``<cache_root>/synthetic-v{GENERATOR_VERSION}-s{seed}-{image_size}`` with a
    ``dataset.json`` description; safe when several processes call it at once (each generates
    into a private temp dir and renames it into place; a loser discards its copy).
    """
    parent = Path(cache_root).expanduser() if cache_root else default_cache_root()
    target = parent / f"synthetic-v{GENERATOR_VERSION}-s{seed}-{image_size}"
    marker = target / "dataset.json"
    if marker.is_file():
        return target
    if target.exists():
        raise DatasetError(f"{target}: incomplete synthetic dataset (no dataset.json); delete it")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    staging.chmod(0o755)
    try:
        generate_dataset(staging, seed=seed, image_size=image_size)
        info = {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": image_size,
            "categories": SYNTHETIC_CATEGORIES,
        }
        (staging / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        os.rename(staging, target)
    except OSError:
        if not marker.is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
