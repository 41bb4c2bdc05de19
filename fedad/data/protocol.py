"""The MVTec AD protocol split used by D-ADDA: a third of each defect type's test images may
be trained on; the rest and all good test images are the test split."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedad.data.mvtec import GOOD, Sample


@dataclass(frozen=True)
class ProtocolSplit:
    """Samples for training and for testing, each sorted by (category, split, type, path)."""

    train: list[Sample]  # all train/good + the training share of each defect type's test images
    test: list[Sample]  # the rest of the defect images + all test/good images


def _order(sample: Sample) -> tuple[str, str, str, str]:
    return sample.category, sample.split, sample.defect_type, str(sample.image_path)


def defect_train_count(n: int, fraction: float) -> int:
    """How many of ``n`` defect images go to training: round(n * fraction), at least 1 when
    n >= 2 and fraction > 0, and never all n."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def protocol_split(
    samples: Sequence[Sample], seed: int, defect_train_fraction: float = 1 / 3
) -> ProtocolSplit:
    """Split ``samples`` deterministically from (sample paths, seed).

    Each (category, defect type) group of test defects is sorted by path and permuted by a
    numpy Generator seeded with (seed, crc32 of "category/type"); its first
    :func:`defect_train_count` images go to training. train/good samples are always training,
    test/good samples always test.
    """
    if not 0 <= defect_train_fraction <= 1:
        raise ValueError(f"defect_train_fraction must be in [0, 1]: {defect_train_fraction}")
    train: list[Sample] = []
    test: list[Sample] = []
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.defect_type == GOOD:
            (train if sample.split == "train" else test).append(sample)
        else:
            groups[sample.category, sample.defect_type].append(sample)
    for (category, defect_type), group in groups.items():
        group.sort(key=_order)
        rng = np.random.default_rng([seed, zlib.crc32(f"{category}/{defect_type}".encode())])
        count = defect_train_count(len(group), defect_train_fraction)
        chosen = set(rng.permutation(len(group))[:count].tolist())
        for i, sample in enumerate(group):
            (train if i in chosen else test).append(sample)
    return ProtocolSplit(sorted(train, key=_order), sorted(test, key=_order))
