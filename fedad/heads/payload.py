"""The typed payloads that cross between sites and server, checked on arrival.

A payload is a kind, named float arrays whose shapes follow the kind's template (``K``
prototypes or components, ``D`` feature width) and an example count. Only prototypes, mixture
parameters, cluster / EM / Gaussian statistics, flow weights, feature moments (for the
whitening), the mean anomaly map of normal images (for the map baseline) and scalar score
statistics ever cross; patch features and images never do: no kind has an array with one row
per patch or image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "prototypes": {"prototypes": ("K", "D"), "counts": ("K",)},
    "cluster-stats": {"sums": ("K", "D"), "counts": ("K",)},
    "mixture": {"weights": ("K",), "means": ("K", "D"), "covariances": ("K", "D", "D")},
    "em-stats": {"counts": ("K",), "sums": ("K", "D"), "outer": ("K", "D", "D")},
    "flow": {},  # keys and shapes come from the global flow's state dict
    "feature-moments": {"mean": ("D",), "second": ("D", "D")},
    "gaussian-stats": {"counts": ("K",), "sums": ("K", "C"), "outer": ("K", "C", "C")},
    "normal-map": {"mean": ("S", "S")},
}
"""Array names and shape templates of each payload kind (``S``: the image size, ``C``: the
channels a Gaussian head keeps)."""


class PayloadError(ValueError):
    """A payload that must not be used; the message says why."""


@dataclass(frozen=True)
class Payload:
    """What one site (or the server) sends: ``arrays`` of ``kind`` from ``count`` examples."""

    kind: str
    arrays: dict[str, np.ndarray]
    count: int

    def to_record(self) -> RecordDict:
        """The message content: arrays, the kind and the example count."""
        return RecordDict({
            "head": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                 for k, v in self.arrays.items()}),
            "meta": ConfigRecord({"kind": self.kind}),
            "metrics": MetricRecord({"num-examples": int(self.count)}),
        })


def check_moments(payload: Payload) -> None:
    """PayloadError unless a ``feature-moments`` payload describes a real covariance:
    E[x x^T] - mean mean^T must be symmetric and positive semi-definite (up to rounding)."""
    mean, second = payload.arrays["mean"].astype(np.float64), payload.arrays["second"]
    covariance = second.astype(np.float64) - np.outer(mean, mean)
    scale = max(float(np.abs(second).max()), 1e-12)
    if np.abs(covariance - covariance.T).max() > 1e-6 * scale:
        raise PayloadError("feature-moments payload: the second moment is not symmetric")
    if np.linalg.eigvalsh((covariance + covariance.T) / 2).min() < -1e-6 * scale:
        raise PayloadError("feature-moments payload: not a covariance (negative variance)")


def check_gaussian_stats(payload: Payload) -> None:
    """PayloadError unless a ``gaussian-stats`` payload (counts [K], sums [K, C], outer sums
    [K, C, C]) describes K real sample sets: counts >= 1, outer sums symmetric and, less
    sums sums^T / counts, positive semi-definite (up to rounding)."""
    counts, sums = payload.arrays["counts"], payload.arrays["sums"].astype(np.float64)
    outer = payload.arrays["outer"].astype(np.float64)
    if counts.min() < 1:
        raise PayloadError("gaussian-stats payload: a Gaussian has a count below 1")
    scale = np.maximum(np.abs(outer).max(axis=(1, 2)), 1e-12)[:, None]
    if (np.abs(outer - outer.transpose(0, 2, 1)).max(axis=2) > 1e-6 * scale).any():
        raise PayloadError("gaussian-stats payload: the outer-product sums are not symmetric")
    scatter = outer - np.einsum("kc,kd->kcd", sums, sums) / counts[:, None, None]
    lowest = np.linalg.eigvalsh((scatter + scatter.transpose(0, 2, 1)) / 2)[:, 0]
    if (lowest < -1e-6 * scale[:, 0]).any():
        raise PayloadError("gaussian-stats payload: not a scatter matrix (negative variance)")


CHECKS: dict[str, Callable[[Payload], None]] = {"feature-moments": check_moments,
                                                "gaussian-stats": check_gaussian_stats}
"""Checks of a kind's content beyond shapes and finiteness, run on arrival."""


def payload_from_record(content: RecordDict, kind: str, sizes: dict[str, int],
                        reference: dict[str, tuple[int, ...]] | None = None) -> Payload:
    """Read and check a payload of ``kind`` from message content.

    Args:
        sizes: the template symbols' values, e.g. ``{"K": 30, "D": 152}``.
        reference: for ``flow``: the expected array names and shapes.
    Raises:
        PayloadError: wrong kind, missing or extra arrays, a wrong shape, non-float or
            non-finite values, a non-positive example count.
    """
    if "head" not in content.array_records or "meta" not in content.config_records:
        raise PayloadError(f"{kind} payload: no 'head' arrays or 'meta' record")
    got_kind = content.config_records["meta"].get("kind")
    if got_kind != kind:
        raise PayloadError(f"payload kind {got_kind!r}, expected {kind!r}")
    if reference is None:
        reference = {name: tuple(sizes[s] for s in template)
                     for name, template in TEMPLATES[kind].items()}
    record = content.array_records["head"]
    if set(record.keys()) != set(reference):
        raise PayloadError(f"{kind} payload: arrays {sorted(record.keys())[:6]}, expected "
                           f"{sorted(reference)[:6]}")
    arrays = {}
    for name, shape in reference.items():
        values = record[name].numpy()
        if tuple(values.shape) != tuple(shape):
            raise PayloadError(f"{kind} payload: {name} shape {list(values.shape)} != "
                               f"{list(shape)}")
        if values.dtype.kind != "f" or not np.isfinite(values).all():
            raise PayloadError(f"{kind} payload: {name} has non-finite or non-float values")
        arrays[name] = values
    count = content.metric_records.get("metrics", {}).get("num-examples", 0)
    if not isinstance(count, int | float) or not count > 0:
        raise PayloadError(f"{kind} payload: num-examples={count!r} must be > 0")
    payload = Payload(kind, arrays, int(count))
    if kind in CHECKS:
        CHECKS[kind](payload)
    return payload


def attach_arrays(content: RecordDict, name: str, arrays: dict[str, np.ndarray]) -> RecordDict:
    """``content`` with ``arrays`` as its array record ``name`` (what the server sends along
    with a global head: the whitening, the map baseline)."""
    content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return content


def attached_arrays(content: RecordDict, name: str, shapes: dict[str, tuple[int, ...]]
                    ) -> dict[str, np.ndarray] | None:
    """The array record ``name`` of a message as float32 arrays (None when it has none),
    checked: exactly the names of ``shapes``, those shapes, finite floats; PayloadError
    otherwise."""
    if name not in content.array_records:
        return None
    record = content.array_records[name]
    if set(record.keys()) != set(shapes):
        raise PayloadError(f"{name}: arrays {sorted(record.keys())}, expected {sorted(shapes)}")
    arrays = {key: record[key].numpy() for key in shapes}
    for key, values in arrays.items():
        if values.shape != tuple(shapes[key]):
            raise PayloadError(f"{name}: {key} shape {list(values.shape)}, expected "
                               f"{list(shapes[key])}")
        if values.dtype.kind != "f" or not np.isfinite(values).all():
            raise PayloadError(f"{name}: {key} has non-finite or non-float values")
    return {key: values.astype(np.float32) for key, values in arrays.items()}
