"""Partitioners: which client gets which training sample.

All are deterministic from (sample order, scheme, number of partitions, seed, alpha) and give
every client normal images. Implemented with numpy rather than flwr-datasets, whose partitioners
work on a Hugging Face ``datasets.Dataset`` and would add ~270 MB for these few lines.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from fedad.data import Sample
from fedad.data.mvtec import GOOD


class PartitionError(ValueError):
    """A partitioning setting that cannot work; the message names the setting."""


def _groups(samples: Sequence[Sample], key: Callable[[Sample], Hashable]) -> dict:
    """Sample indices by ``key``, in sorted key order: {key: int array}."""
    groups: dict[Hashable, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(key(sample), []).append(i)
    return {k: np.asarray(groups[k], dtype=np.int64) for k in sorted(groups, key=str)}


def _deal_groups(samples: Sequence[Sample], indices: np.ndarray, key: Callable[[Sample], Hashable],
                 n: int, rng: np.random.Generator, out: np.ndarray, offset: int = 0) -> int:
    """Deal ``indices`` [K] group by group of ``key``, each group shuffled and dealt round-robin
    from where the previous one stopped: near-equal shares of each group. Returns the next
    client offset."""
    for members in _groups([samples[i] for i in indices], key).values():
        out[rng.permutation(indices[members])] = (offset + np.arange(len(members))) % n
        offset = (offset + len(members)) % n
    return offset


def _with_label(samples: Sequence[Sample], label: int) -> np.ndarray:
    """Indices of the samples with ``label`` (0 normal, 1 defect)."""
    return np.asarray([i for i, s in enumerate(samples) if s.label == label], dtype=np.int64)


def _defect_types(samples: Sequence[Sample]) -> dict:
    """Indices of the defect samples by defect type name, sorted by name."""
    by_type = _groups(samples, lambda s: s.defect_type)
    return {name: indices for name, indices in by_type.items() if name != GOOD}


def _deal_goods(samples: Sequence[Sample], n: int, rng: np.random.Generator,
                out: np.ndarray) -> int:
    """Normal images dealt round-robin category by category; returns the next client offset."""
    return _deal_groups(samples, _with_label(samples, 0), lambda s: s.category, n, rng, out)


def _iid(samples: Sequence[Sample], n: int, rng: np.random.Generator, alpha: float,
         out: np.ndarray) -> None:
    """Normal images, then each (category, defect type), dealt round-robin: every client's
    share of each is within one of the others'."""
    offset = _deal_goods(samples, n, rng, out)
    _deal_groups(samples, _with_label(samples, 1), lambda s: (s.category, s.defect_type), n, rng,
                 out, offset)


def _label_wise(samples: Sequence[Sample], n: int, rng: np.random.Generator, alpha: float,
                out: np.ndarray) -> None:
    """Defect type k (sorted by name) on client k % n; normal images dealt evenly."""
    defects = _defect_types(samples)
    if n > len(defects):
        found = ", ".join(defects) or "none; set use-real-defects=true"
        raise PartitionError(
            f"partitioner=label-wise: num-partitions={n} exceeds the {len(defects)} defect "
            f"types of the training pool ({found}); each client needs its own defect type"
        )
    _deal_goods(samples, n, rng, out)
    for k, indices in enumerate(defects.values()):
        out[indices] = k % n


def _dirichlet(samples: Sequence[Sample], n: int, rng: np.random.Generator, alpha: float,
               out: np.ndarray) -> None:
    """Each defect type split by proportions ~ Dirichlet(alpha); normal images dealt evenly."""
    if not alpha > 0:
        raise PartitionError(f"partitioner=dirichlet: dirichlet-alpha={alpha} must be > 0")
    _deal_goods(samples, n, rng, out)
    for indices in _defect_types(samples).values():
        shuffled = rng.permutation(indices)
        cuts = np.round(np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(indices))
        for client, part in enumerate(np.split(shuffled, cuts.astype(np.int64))):
            out[part] = client


def _by_category(samples: Sequence[Sample], n: int, rng: np.random.Generator, alpha: float,
                 out: np.ndarray) -> None:
    """Category k (sorted by name) on client k % n."""
    categories = _groups(samples, lambda s: s.category)
    if n > len(categories):
        raise PartitionError(
            f"partitioner=by-category: num-partitions={n} exceeds the {len(categories)} "
            f"categories ({', '.join(categories)}); use category=all or fewer partitions"
        )
    for k, indices in enumerate(categories.values()):
        out[indices] = k % n


_SCHEMES = {"iid": _iid, "label-wise": _label_wise, "dirichlet": _dirichlet,
            "by-category": _by_category}
PARTITIONERS = tuple(_SCHEMES)


def assign_partitions(
    samples: Sequence[Sample], scheme: str, num_partitions: int, seed: int, alpha: float = 0.5
) -> np.ndarray:
    """Partition id of every sample.

    Args:
        samples: the training pool [M] (normal images and, possibly, real training defects).
        scheme: ``iid`` (every client a near-equal share of every category/defect type),
            ``label-wise`` (defect type k, sorted by name, on client k % n; normal images
            spread evenly), ``dirichlet`` (each defect type split by proportions
            ~ Dirichlet(alpha * ones(n)); normal images spread evenly), ``by-category``
            (category k, sorted by name, on client k % n).
        num_partitions: number of clients n.
        seed: seed of the numpy Generator behind every random choice.
        alpha: Dirichlet concentration (``dirichlet`` only); small alpha = skewed.
    Returns:
        int array [M] with values in [0, n).
    Raises:
        PartitionError: unknown scheme, n < 1, a scheme that cannot give n clients their own
            share, or a client left without normal images.
    """
    if scheme not in _SCHEMES:
        raise PartitionError(f"partitioner={scheme!r}: expected one of {', '.join(PARTITIONERS)}")
    if num_partitions < 1:
        raise PartitionError(f"num-partitions={num_partitions}: must be >= 1")
    out = np.full(len(samples), -1, dtype=np.int64)
    _SCHEMES[scheme](samples, num_partitions, np.random.default_rng(seed), alpha, out)
    goods = np.bincount(out[_with_label(samples, 0)], minlength=num_partitions)
    if (goods == 0).any():
        raise PartitionError(
            f"partitioner={scheme}: num-partitions={num_partitions} leaves "
            f"{(goods == 0).sum()} client(s) without normal images "
            f"({goods.sum()} in the training pool)"
        )
    return out
