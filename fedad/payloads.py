"""What crosses between sites and server: model arrays and metrics, checked before use.

Only the trainable part of a model crosses (a frozen pretrained backbone stays on each site).
Every reply is checked before aggregation: same keys and shapes as the global model, finite
values, finite scalar metrics. A refused reply is logged with its node id and reason.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

log = logging.getLogger(__name__)


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why ``arrays`` cannot be aggregated with ``reference``, or None when it can."""
    if list(arrays.keys()) != list(reference.keys()):
        missing = set(reference.keys()) - set(arrays.keys())
        unexpected = set(arrays.keys()) - set(reference.keys())
        return f"keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
    for key, array in arrays.items():
        ref = reference[key]
        if tuple(array.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(array.shape)} != {tuple(ref.shape)}"
        values = array.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"{key}: non-finite values"
    return None


MAX_METRIC_VALUES = 1024
"""Longest list a metric may hold: summary statistics (a prototype) cross, features never."""


def check_metrics(metrics: MetricRecord) -> str | None:
    """Why ``metrics`` cannot be used (a non-finite value, an over-long list), or None."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_METRIC_VALUES:
            return f"metric {key}: {len(values)} values (at most {MAX_METRIC_VALUES} may cross)"
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric {key}: non-finite value"
    return None


def arrays_digest(arrays: ArrayRecord) -> str:
    """Short SHA-256 of a payload's bytes, for the log of what crossed."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(key.encode())
        digest.update(array.data)
    return digest.hexdigest()[:16]
