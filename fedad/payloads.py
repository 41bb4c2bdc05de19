"""What crosses between sites and server: model arrays and metrics, checked before use.

Only the trainable part of a model crosses (a frozen pretrained backbone stays on each site).
Every reply is checked before aggregation: same keys and shapes as the global model, finite
values, finite scalar metrics. A refused reply is logged with its node id and reason, and
every payload that reached the server is a row of the run's audit log (:class:`AuditLog`, one
schema for every method: :func:`audit_row`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

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


def digest(arrays: Mapping[str, Array | np.ndarray]) -> str:
    """Short SHA-256 (16 hex digits) of named arrays, in their order: the one digest of the
    audit log (and of a head or whitening a site has already scored under)."""
    sha = hashlib.sha256()
    for key, array in arrays.items():
        sha.update(key.encode())
        sha.update((array if isinstance(array, Array) else Array(np.ascontiguousarray(array))).data)
    return sha.hexdigest()[:16]


@dataclass(frozen=True)
class Query:
    """A method's custom query: the site action it calls and, for a typed payload, the kind
    that answers it. Flower routes message type ``query.<action>`` to the ClientApp handler
    registered for ``<action>``."""

    action: str
    payload_kind: str = ""

    @property
    def message(self) -> str:
        """The Flower message type."""
        return f"query.{self.action}"

    @property
    def kind(self) -> str:
        """The audit log's ``kind`` of a reply: the payload kind, else the message type."""
        return self.payload_kind or self.message


SERVER_ROUND = "server-round"
"""Config key of every server message: the round it belongs to (Flower's strategies set it)."""

AUDIT_FILE = "payloads.jsonl"
"""The audit log of a results folder: one row per payload that reached the server."""


def audit_row(*, server_round: int, node: int, kind: str, accepted: bool, reason: str = "",
              arrays: Mapping[str, Array | np.ndarray] | None = None, count: int | None = None,
              **details: Any) -> dict[str, Any]:
    """One row of the audit log, the same schema for every method and stage.

    Keys: ``time`` (UTC), ``round``, ``node``, ``kind`` (what the payload is), ``accepted``,
    ``reason`` (why it was refused, or empty), ``count`` (examples it summarises, when known),
    ``shapes`` / ``bytes`` / ``digest`` of its arrays (when it had any) and ``details`` (what a
    method adds, e.g. the counts of an upload's images and masks).
    """
    row: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "round": int(server_round),
        "node": int(node), "kind": kind, "accepted": bool(accepted), "reason": reason,
        "count": count, "shapes": None, "bytes": None, "digest": None, "details": details,
    }
    if arrays is not None:
        # shapes and sizes from the Arrays' headers: no reply is deserialized for its audit row
        row.update(shapes={k: list(a.shape) for k, a in arrays.items()},
                   bytes=int(sum(len(a.data) if isinstance(a, Array) else np.asarray(a).nbytes
                                 for a in arrays.values())), digest=digest(arrays))
    return row


def message_arrays(msg: Message) -> Mapping[str, Array] | None:
    """A reply's arrays for its audit row: its one ArrayRecord as it is, several under
    ``record/key`` names, None when it carries none (or is an error)."""
    if msg.has_error() or not msg.content.array_records:
        return None
    records = msg.content.array_records
    if len(records) == 1:
        return next(iter(records.values()))
    return {f"{name}/{key}": array for name, record in records.items()
            for key, array in record.items()}


class AuditLog:
    """The rows of :data:`AUDIT_FILE` (see :func:`audit_row`), appended to the file as they
    arrive, so a server killed midway leaves every row it received; a resumed run keeps the
    interrupted attempt's rows and appends its own after a ``resume`` row.

    Args:
        path: the file; None keeps the rows in memory only (a strategy used outside a run).
        resume: continue the file's rows instead of starting a fresh log.
    """

    def __init__(self, path: Path | None = None, resume: bool = False) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is None:
            return
        if resume and path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines()
                         if line.strip()]
        else:
            path.write_text("")

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        """Add one :func:`audit_row` (written at once)."""
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
