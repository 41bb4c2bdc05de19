"""The MVTec protocol split: deterministic, ~1/3 of each defect type in training, complete."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedad.data import ProtocolSplit, Sample, protocol_split
from fedad.data.protocol import defect_train_count

DEFECTS = {"crack": 12, "hole": 9, "scratch": 2, "stain": 1}


def make_samples(category: str = "hex_nut") -> list[Sample]:
    """Samples of one category (files need not exist): 10 train, 5 test/good, DEFECTS."""
    base = Path("/data") / category

    def sample(split: str, kind: str, i: int) -> Sample:
        mask = None if kind == "good" else base / "ground_truth" / kind / f"{i:03d}_mask.png"
        return Sample(category, split, kind, base / split / kind / f"{i:03d}.png", mask)

    samples = [sample("train", "good", i) for i in range(10)]
    samples += [sample("test", "good", i) for i in range(5)]
    samples += [sample("test", kind, i) for kind, n in DEFECTS.items() for i in range(n)]
    return samples


def paths(samples: list[Sample]) -> list[Path]:
    return [s.image_path for s in samples]


@pytest.fixture()
def samples() -> list[Sample]:
    return make_samples("hex_nut") + make_samples("brick")


def test_deterministic_and_order_independent(samples: list[Sample]) -> None:
    first = protocol_split(samples, seed=3)
    shuffled = samples.copy()
    random.Random(0).shuffle(shuffled)
    assert protocol_split(shuffled, seed=3) == first
    assert paths(protocol_split(samples, seed=4).train) != paths(first.train)


def test_partition_of_all_samples(samples: list[Sample]) -> None:
    split = protocol_split(samples, seed=0)
    assert isinstance(split, ProtocolSplit)
    assert not set(split.train) & set(split.test)
    assert sorted(paths(split.train + split.test)) == sorted(paths(samples))
    assert all(s.split == "test" for s in split.test)
    assert {s for s in samples if s.split == "train"} <= set(split.train)
    assert {s for s in samples if s.split == "test" and s.label == 0} <= set(split.test)


def test_a_third_of_each_defect_type(samples: list[Sample]) -> None:
    split = protocol_split(samples, seed=0)
    expected = {"crack": 4, "hole": 3, "scratch": 1, "stain": 0}
    for category in ("hex_nut", "brick"):
        for kind, count in expected.items():
            chosen = [s for s in split.train if (s.category, s.defect_type) == (category, kind)]
            assert len(chosen) == count, (category, kind)


def test_zero_fraction_trains_on_good_only(samples: list[Sample]) -> None:
    split = protocol_split(samples, seed=0, defect_train_fraction=0)
    assert all(s.split == "train" and s.label == 0 for s in split.train)


@pytest.mark.parametrize(
    ("n", "fraction", "count"),
    [(0, 1 / 3, 0), (1, 1 / 3, 0), (2, 1 / 3, 1), (3, 0.1, 1), (12, 1 / 3, 4), (5, 1.0, 4)],
)
def test_defect_train_count(n: int, fraction: float, count: int) -> None:
    assert defect_train_count(n, fraction) == count


def test_rejects_bad_fraction(samples: list[Sample]) -> None:
    with pytest.raises(ValueError, match="defect_train_fraction"):
        protocol_split(samples, seed=0, defect_train_fraction=1.5)
