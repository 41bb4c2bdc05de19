"""Partitioners: which client gets which training sample.

All are deterministic from (sample order, scheme, number of partitions, seed, alpha) and give
every client normal images. Implemented with numpy rather than flwr-datasets, whose partitioners
work on a Hugging Face ``datasets.Dataset`` and would add ~270 MB for these few lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedad.data import Sample

PARTITIONERS = ("iid", "label-wise", "dirichlet", "by-category")


class PartitionError(ValueError):
    """A partitioning setting that cannot work; the message names the setting."""


def _groups(samples: Sequence[Sample], key) -> dict[object, np.ndarray]:
    groups: dict[object, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(key(sample), []).append(i)
    return {k: np.asarray(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def _spread_evenly(indices: np.ndarray, n: int, rng: np.random.Generator, offset: int,
                   out: np.ndarray) -> int:
    """Shuffle ``indices`` and deal them round-robin from client ``offset``; returns next offset."""
    shuffled = rng.permutation(indices)
    out[shuffled] = (offset + np.arange(len(shuffled))) % n
    return (offset + len(shuffled)) % n


def assign_partitions(
    samples: Sequence[Sample], scheme: str, num_partitions: int, seed: int, alpha: float = 0.5
) -> np.ndarray:
    """Partition id of every sample.

    Args:
        samples: the training pool (normal images and, possibly, real training defects).
        scheme: ``iid`` (every client an equal share of every category/defect type),
            ``label-wise`` (one client per defect type, normal images spread evenly),
            ``dirichlet`` (each defect type split by proportions ~ Dirichlet(alpha)),
            ``by-category`` (each client a different category).
        num_partitions: number of clients.
    Returns:
        int array [len(samples)] with values in [0, num_partitions).
    """
    if scheme not in PARTITIONERS:
        raise PartitionError(f"partitioner={scheme!r}: expected one of {', '.join(PARTITIONERS)}")
    if num_partitions < 1:
        raise PartitionError(f"num-partitions={num_partitions}: must be >= 1")
    n = num_partitions
    rng = np.random.default_rng(seed)
    out = np.full(len(samples), -1, dtype=np.int64)
    defect_types = sorted({s.defect_type for s in samples if s.label})
    goods = np.asarray([i for i, s in enumerate(samples) if not s.label], dtype=np.int64)

    if scheme == "iid":
        offset = 0
        for indices in _groups(samples, lambda s: (s.category, s.defect_type)).values():
            offset = _spread_evenly(indices, n, rng, offset, out)
    elif scheme == "by-category":
        categories = sorted({s.category for s in samples})
        if n > len(categories):
            raise PartitionError(
                f"partitioner=by-category: num-partitions={n} exceeds the "
                f"{len(categories)} categories ({', '.join(categories)})"
            )
        for i, sample in enumerate(samples):
            out[i] = categories.index(sample.category) % n
    else:
        offset = 0
        for indices in _groups([samples[i] for i in goods], lambda s: s.category).values():
            offset = _spread_evenly(goods[indices], n, rng, offset, out)
        defects = _groups(samples, lambda s: s.defect_type)
        if scheme == "label-wise":
            if defect_types and n > len(defect_types):
                raise PartitionError(
                    f"partitioner=label-wise: num-partitions={n} exceeds the "
                    f"{len(defect_types)} defect types ({', '.join(defect_types)})"
                )
            for k, name in enumerate(defect_types):
                out[defects[name]] = k % n
        else:
            for name in defect_types:
                indices = rng.permutation(defects[name])
                shares = rng.dirichlet(np.full(n, alpha))
                cuts = np.round(np.cumsum(shares)[:-1] * len(indices)).astype(int)
                for client, part in enumerate(np.split(indices, cuts)):
                    out[part] = client
    counts = np.bincount(out[goods], minlength=n) if len(goods) else np.zeros(n, int)
    if (counts == 0).any():
        raise PartitionError(
            f"partitioner={scheme}: num-partitions={n} leaves client(s) "
            f"{np.flatnonzero(counts == 0).tolist()} without normal images ({len(goods)} in all)"
        )
    return out
