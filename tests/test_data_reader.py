"""The MVTec-layout reader: scanning, loading, the torch Dataset, and every bad input."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedad.data import (
    AnomalyDataset,
    DatasetError,
    generate_dataset,
    list_categories,
    load_image,
    load_mask,
    scan_category,
    validate_dataset,
)
from fedad.data.synthetic import defect_types

CATEGORIES = ["brick", "hex_nut"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (96x96): 4 train, 2 test/good and 2 per defect type."""
    root = tmp_path_factory.mktemp("tiny")
    return generate_dataset(
        root,
        image_size=96,
        num_train=4,
        num_test_good=2,
        num_test_per_defect=2,
        categories=CATEGORIES,
    )


@pytest.fixture()
def copy(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset's hex_nut category, free to break."""
    shutil.copytree(tiny / "hex_nut", tmp_path / "hex_nut")
    return tmp_path


def test_list_categories(tiny: Path) -> None:
    (tiny / "not_a_category").mkdir(exist_ok=True)
    assert list_categories(tiny) == CATEGORIES


@pytest.mark.parametrize("category", CATEGORIES)
def test_scan_counts_labels_and_order(tiny: Path, category: str) -> None:
    samples = scan_category(tiny, category)
    assert samples == scan_category(tiny, category, check_content=False)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert samples[: len(train)] == train and len(train) == 4
    assert len(test) == 2 + 2 * len(defect_types(category))
    assert sorted({s.defect_type for s in test}) == sorted(["good", *defect_types(category)])
    for s in samples:
        assert s.category == category
        assert s.label == int(s.defect_type != "good")
        assert (s.mask_path is None) == (s.label == 0)
        if s.mask_path is not None:
            assert s.mask_path.name == f"{s.image_path.stem}_mask.png"


def test_dataset_items(tiny: Path) -> None:
    samples = scan_category(tiny, "hex_nut")
    dataset = AnomalyDataset(samples, image_size=64)
    assert dataset.defect_types == ["good", *defect_types("hex_nut")]
    assert len(dataset) == len(samples)
    for index in range(len(dataset)):
        item = dataset[index]
        image, mask = item["image"], item["mask"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.long and item["label"].ndim == 0
        assert item["label"].item() == samples[index].label == int(mask.max().item())
        kind = dataset.defect_types[item["defect_class"].item()]
        assert kind == samples[index].defect_type and item["index"] == index
    assert torch.equal(dataset[0]["image"], dataset[0]["image"])


def test_dataset_defect_types_argument(tiny: Path) -> None:
    samples = scan_category(tiny, "hex_nut")
    names = ["good", "stain", *defect_types("hex_nut")]
    dataset = AnomalyDataset(samples, image_size=32, defect_types=names, cache=False)
    assert all(
        names[item["defect_class"]] == s.defect_type
        for item, s in zip(dataset, samples, strict=True)
    )
    with pytest.raises(ValueError, match="start with 'good'"):
        AnomalyDataset(samples, 32, defect_types=["crack", "good"])
    with pytest.raises(ValueError, match="not in"):
        AnomalyDataset(samples, 32, defect_types=["good", "crack"])


def test_other_resolutions_and_formats(tmp_path: Path) -> None:
    """A 100x80 JPEG/gray BMP/TIFF category with a left-half mask, resized to 64."""
    cat = tmp_path / "part"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (cat / folder).mkdir(parents=True)
    Image.new("RGB", (100, 80), (255, 128, 0)).save(cat / "train/good/a.jpg", quality=100)
    Image.new("L", (100, 80), 200).save(cat / "test/good/b.bmp")
    Image.new("RGB", (100, 80), (0, 0, 255)).save(cat / "test/dent/c.tif")
    mask = np.zeros((80, 100), np.uint8)
    mask[:, :50] = 255
    Image.fromarray(mask).save(cat / "ground_truth/dent/c_mask.png")

    samples = scan_category(tmp_path, "part")
    assert [s.image_path.name for s in samples] == ["a.jpg", "c.tif", "b.bmp"]
    image = load_image(samples[0].image_path, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[32, 32], [1.0, 128 / 255, 0.0], atol=0.02)
    gray = load_image(samples[2].image_path, 64)
    np.testing.assert_allclose(gray, 200 / 255, atol=1e-6)
    resized = load_mask(samples[1].mask_path, 64)
    assert resized.shape == (64, 64) and resized.dtype == np.float32
    assert resized[:, :32].min() == 1 and resized[:, 32:].max() == 0
    assert not load_mask(None, 16).any()


def test_validate_dataset_summary(tiny: Path) -> None:
    lines = validate_dataset(tiny)
    assert len(lines) == 2
    brick = "brick: train 4 (good 4) | test 10 (good 2, crack 2, hole 2, scratch 2, stain 2)"
    assert lines[0] == brick
    assert lines[1].startswith("hex_nut: train 4 (good 4) | test 12 (good 2, contamination 2")


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _drop_mask(root: Path) -> tuple[Path, str]:
    _first(root, "hex_nut/ground_truth/crack/*_mask.png").unlink()
    return _first(root, "hex_nut/test/crack/*.png"), "defect image without mask"


def _resize_mask(root: Path) -> tuple[Path, str]:
    path = _first(root, "hex_nut/ground_truth/hole/*_mask.png")
    Image.open(path).resize((50, 40)).save(path)
    return path, "mask size 50x40 does not match image size 96x96"


def _grey_mask(root: Path) -> tuple[Path, str]:
    path = _first(root, "hex_nut/ground_truth/scratch/*_mask.png")
    values = np.zeros((96, 96), np.uint8)
    values[10:20, 10:20], values[30:40, 30:40] = 128, 255
    Image.fromarray(values).save(path)
    return path, "non-binary mask (values 0, 128, 255"


def _corrupt_image(root: Path) -> tuple[Path, str]:
    path = _first(root, "hex_nut/train/good/*.png")
    path.write_bytes(b"not an image at all")
    return path, "unreadable image"


def _corrupt_defect_image(root: Path) -> tuple[Path, str]:
    path = _first(root, "hex_nut/test/hole/*.png")
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return path, "unreadable image"


def _empty_train(root: Path) -> tuple[Path, str]:
    for path in (root / "hex_nut/train/good").iterdir():
        path.unlink()
    return root / "hex_nut/train/good", "empty split (no training images)"


def _empty_test(root: Path) -> tuple[Path, str]:
    shutil.rmtree(root / "hex_nut/test")
    (root / "hex_nut/test/good").mkdir(parents=True)
    return root / "hex_nut/test", "empty split (no test images)"


@pytest.mark.parametrize(
    "breakage",
    [
        _drop_mask,
        _resize_mask,
        _grey_mask,
        _corrupt_image,
        _corrupt_defect_image,
        _empty_train,
        _empty_test,
    ],
)
def test_bad_input_names_file_and_problem(
    copy: Path, breakage: Callable[[Path], tuple[Path, str]]
) -> None:
    path, problem = breakage(copy)
    for check in (lambda: scan_category(copy, "hex_nut"), lambda: validate_dataset(copy)):
        with pytest.raises(DatasetError) as info:
            check()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: ") and problem in message, message


def test_missing_category_lists_available(copy: Path) -> None:
    with pytest.raises(DatasetError) as info:
        scan_category(copy, "bottle")
    assert str(info.value) == f"{copy / 'bottle'}: category not found (available: hex_nut)"
    with pytest.raises(DatasetError, match="no such directory"):
        list_categories(copy / "nowhere")


def test_check_content_false_skips_decoding(copy: Path) -> None:
    _corrupt_image(copy)
    assert len(scan_category(copy, "hex_nut", check_content=False)) == 4 + 2 + 2 * 5

