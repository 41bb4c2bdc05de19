"""The synthetic generator: determinism, layout, exact masks, difficulty, and the shared cache."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import rankdata

from fedad.data import (
    DEFAULT_CATEGORY,
    SYNTHETIC_CATEGORIES,
    ensure_synthetic,
    generate_dataset,
    load_image,
    load_mask,
    scan_category,
    synthetic,
    validate_dataset,
)
from fedad.data.synthetic import defect_types, render_sample, sample_rng

SMALL = {"image_size": 64, "num_train": 2, "num_test_good": 1, "num_test_per_defect": 2}


def digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every category at 64x64: 2 train, 1 test/good, 2 per defect type (seed 0)."""
    return generate_dataset(tmp_path_factory.mktemp("small"), seed=0, **SMALL)


def test_categories_and_default() -> None:
    kinds = list(SYNTHETIC_CATEGORIES.values())
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    assert DEFAULT_CATEGORY in SYNTHETIC_CATEGORIES


def test_deterministic_by_seed(small: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", seed=0, **SMALL)
    other = generate_dataset(tmp_path / "other", seed=1, **SMALL)
    assert digests(again) == digests(small)
    other_digests = digests(other)
    assert other_digests.keys() == digests(small).keys()
    assert all(other_digests[k] != v for k, v in digests(small).items() if k.endswith(".png"))


def test_layout_and_counts(small: Path) -> None:
    assert len(validate_dataset(small)) == len(SYNTHETIC_CATEGORIES)
    for category in SYNTHETIC_CATEGORIES:
        samples = scan_category(small, category)
        kinds = {s.defect_type for s in samples} - {"good"}
        assert len(kinds) >= 4 and kinds == set(defect_types(category))
        assert sum(s.split == "train" for s in samples) == SMALL["num_train"]
        stems = [s.image_path.stem for s in samples if s.defect_type == "hole"]
        assert stems == ["000", "001"]
        with Image.open(samples[0].image_path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_masks_are_exactly_the_changed_pixels(small: Path) -> None:
    for category in SYNTHETIC_CATEGORIES:
        for sample in scan_category(small, category):
            index = int(sample.image_path.stem)
            rng = sample_rng(0, category, sample.split, sample.defect_type, index)
            clean, image, mask = render_sample(category, sample.defect_type, rng, 64)
            assert np.array_equal(np.asarray(Image.open(sample.image_path)), image)
            changed = (clean != image).any(axis=-1)
            assert np.array_equal(mask, changed)
            if sample.mask_path is not None:
                with Image.open(sample.mask_path) as stored:
                    values = np.asarray(stored)
                assert set(np.unique(values)) == {0, 255}
                assert np.array_equal(values == 255, changed)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks)."""
    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@pytest.mark.parametrize("category", sorted(SYNTHETIC_CATEGORIES))
def test_intensity_threshold_is_far_from_perfect(tmp_path: Path, category: str) -> None:
    root = generate_dataset(tmp_path, categories=[category])
    samples = scan_category(root, category)
    gray = {s: load_image(s.image_path, 128).mean(axis=-1) for s in samples}
    median = np.median([gray[s] for s in samples if s.split == "train"], axis=0)
    test = [s for s in samples if s.split == "test"]
    intensity = np.stack([gray[s] for s in test]).ravel()
    labels = np.stack([load_mask(s.mask_path, 128) for s in test]).ravel() > 0
    scores = {
        "bright": intensity,
        "dark": -intensity,
        "median_difference": np.abs(np.stack([gray[s] for s in test]) - median).ravel(),
    }
    for name, score in scores.items():
        assert auroc(score, labels) < 0.95, name


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDAD_CACHE", str(tmp_path))
    root = ensure_synthetic(seed=2, image_size=32)
    assert root == tmp_path / "synthetic-v1-s2-32"
    info = json.loads((root / "dataset.json").read_text())
    assert info["seed"] == 2 and info["image_size"] == 32
    assert set(info["categories"]) == set(SYNTHETIC_CATEGORIES)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_synthetic(tmp_path, seed=2, image_size=32) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def _ensure_in_child(cache: str, queue: multiprocessing.Queue) -> None:
    queue.put(str(ensure_synthetic(cache, seed=0, image_size=32)))


def test_ensure_synthetic_is_safe_under_concurrency(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_ensure_in_child, args=(str(tmp_path), queue)) for _ in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    roots = {queue.get(timeout=5) for _ in workers}
    assert roots == {str(tmp_path / "synthetic-v1-s0-32")}
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic-v1-s0-32"]
    assert len(validate_dataset(tmp_path / "synthetic-v1-s0-32")) == len(SYNTHETIC_CATEGORIES)


def test_ensure_synthetic_loser_uses_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process finishes while this one generates: keep the winner, drop the copy."""
    winner = tmp_path / "synthetic-v1-s0-32"

    def finish_elsewhere(out: Path, **_: object) -> Path:
        (winner / "brick").mkdir(parents=True)
        (winner / "dataset.json").write_text("{}")
        return out

    monkeypatch.setattr(synthetic, "generate_dataset", finish_elsewhere)
    assert ensure_synthetic(tmp_path, seed=0, image_size=32) == winner
    assert [p.name for p in tmp_path.iterdir()] == [winner.name]
    assert (winner / "dataset.json").read_text() == "{}"
