"""Aggregation of replies that carry only the parameters a site trained.

A NexViTAD site replies the adapters and projections (every site trains them) and only the
heads of the categories it holds (:func:`fedad.nexvitad.training.trained_prefixes`). Averaging
a head that one site trained with the untouched copies of the others would shrink its update
by that site's share of the examples; instead:

- a key every usable reply carries (the shared encoder parameters) goes through the run's
  strategy (any of the registry: FedAvg, FedProx, ACA, ...), each reply first checked and
  audited as it crossed, then completed with the global values of the keys it lacks so that
  the strategy sees whole models;
- a key only some replies carry (a site-specific head) is the example-weighted mean over the
  replies that carry it (FedAvg per parameter over the sites that trained it);
- a key no reply carries keeps its global value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedad.payloads import check_arrays
from strategies.guard import GuardedStrategy

Trained = tuple[Mapping[str, np.ndarray], float]
"""(the arrays one site trained, its example weight)."""


def partial_refusal(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why a reply's arrays (a subset of ``reference``'s keys) cannot be merged, or None:
    unknown keys, wrong shapes or non-finite values."""
    unknown = sorted(set(arrays.keys()) - set(reference.keys()))
    if unknown:
        return f"unexpected keys {unknown[:3]}"
    return check_arrays(arrays, ArrayRecord({k: reference[k] for k in arrays}))


def completed(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every key of ``reference`` it lacks taken from ``reference``, in
    ``reference``'s order."""
    return ArrayRecord({k: arrays[k] if k in arrays else reference[k] for k in reference})


def merge_per_key(aggregated: ArrayRecord, reference: ArrayRecord,
                  trained: Sequence[Trained]) -> ArrayRecord:
    """The new global arrays: for each key of ``reference``, the strategy's ``aggregated``
    value when every entry of ``trained`` carries it, the example-weighted mean of the entries
    that carry it when only some do, ``reference``'s value when none does."""
    out = {}
    for key in reference:
        carriers = [(arrays[key], weight) for arrays, weight in trained if key in arrays]
        if carriers and len(carriers) == len(trained):
            out[key] = aggregated[key]
            continue
        if not carriers:
            out[key] = reference[key]
            continue
        values = np.stack([np.asarray(v, dtype=np.float64) for v, _ in carriers])
        weights = np.array([w for _, w in carriers], dtype=np.float64)
        mean = np.tensordot(weights / weights.sum(), values, axes=1)
        dtype = np.asarray(carriers[0][0]).dtype
        out[key] = Array(np.asarray(np.rint(mean) if dtype.kind in "iu" else mean, dtype=dtype))
    return ArrayRecord(out)


def example_weight(msg: Message) -> float:
    """A reply's ``num-examples`` (1.0 when it reports none)."""
    for record in msg.content.metric_records.values():
        if isinstance(record, MetricRecord) and "num-examples" in record:
            return float(record["num-examples"])
    return 1.0


class SiteKeyGuard(GuardedStrategy):
    """The reply guard for sites that reply a subset of the global keys (module docstring).
    A reply is checked and audited as it crossed (its own keys: known, right shapes,
    finite), then completed for the strategy."""

    def __init__(self, inner: Strategy, min_replies: int = 1) -> None:
        super().__init__(inner, min_replies)
        self.trained: list[Trained] = []

    @classmethod
    def around(cls, guarded: GuardedStrategy) -> SiteKeyGuard:
        """The same inner strategy and minimum replies as ``guarded``."""
        return cls(guarded.inner, guarded.min_replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and complete the replies, let the strategy aggregate, then replace the
        site-specific keys by their per-key means."""
        self.trained = []
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None or self.global_arrays is None or not self.trained:
            return aggregated, metrics
        return merge_per_key(aggregated, self.global_arrays, self.trained), metrics

    def _refusal(self, content: RecordDict, check_payload: bool) -> tuple[str | None, dict]:
        """The guard's metric checks, then :func:`partial_refusal` of the reply's arrays."""
        reason, details = super()._refusal(content, False)
        if reason or not check_payload or self.global_arrays is None:
            return reason, details
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}", {}
        return partial_refusal(next(iter(content.array_records.values())), self.global_arrays), {}

    def _screen(self, server_round: int, replies: Iterable[Message], *,
                check_payload: bool) -> list[Message]:
        """The guard's screening; each accepted training reply is then remembered (for
        :func:`merge_per_key`) and completed with the global values it lacks."""
        kept = super()._screen(server_round, replies, check_payload=check_payload)
        if not check_payload or self.global_arrays is None:
            return kept
        for msg in kept:
            if msg.has_error():
                continue
            name, arrays = next(iter(msg.content.array_records.items()))
            self.trained.append(({k: arrays[k].numpy() for k in arrays}, example_weight(msg)))
            msg.content[name] = completed(arrays, self.global_arrays)
        return kept
