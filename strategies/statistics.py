"""Shared plumbing of strategies that read per-client statistics from replies (ACA, CFA).

Such a strategy wraps a Flower strategy. Sites send bookkeeping metrics besides their model
(``partition``, and ``prototype``, a few floats of normal-feature prototype); the innermost
statistics strategy removes them, and keeps only the metric keys every reply has, before the
Flower strategy aggregates (Flower requires identical keys across replies).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.msvt import protocol

BOOKKEEPING_METRICS = (protocol.PARTITION, protocol.PROTOTYPE)


def reply_metrics(msg: Message) -> MetricRecord:
    """The (single) MetricRecord of a reply."""
    return next(iter(msg.content.metric_records.values()))


def with_metrics(msg: Message, metrics: MetricRecord) -> Message:
    """A copy of reply ``msg`` whose MetricRecord is ``metrics`` (the original is not changed)."""
    out = copy.copy(msg)
    content = RecordDict(dict(msg.content.array_records))
    content["metrics"] = metrics
    out.content = content
    return out


def strategy_chain(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy`` and the strategies it wraps (through ``.inner``), outermost first."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "inner", None)


class StatisticsStrategy(Strategy):
    """Base of wrappers that read client statistics; delegates everything to ``inner``."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        """Delegate."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate (subclasses read their statistics first)."""
        return self.inner.aggregate_train(server_round, self.inward(list(replies)))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def inward(self, replies: list[Message]) -> list[Message]:
        """Replies as the inner strategy should see them: unchanged for another statistics
        strategy; otherwise without bookkeeping metrics and with the keys common to all."""
        if isinstance(self.inner, StatisticsStrategy):
            return replies
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return replies
        common = set.intersection(*(set(reply_metrics(m).keys()) for m in valid))
        common -= set(BOOKKEEPING_METRICS)
        out = []
        for msg in replies:
            if msg.has_error():
                out.append(msg)
                continue
            metrics = reply_metrics(msg)
            out.append(with_metrics(msg, MetricRecord({k: metrics[k] for k in sorted(common)})))
        return out
