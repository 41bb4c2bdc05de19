"""A wrapper that checks every reply before any Flower strategy aggregates it.

A reply whose arrays have other keys or shapes than the global model, non-finite values, or
non-finite metrics is dropped and logged; if the aggregate itself is non-finite, the global model
is kept as it was. An inner strategy whose replies are not model updates (D-ADDA's uploads)
checks them itself: it defines ``check_reply(content) -> (reason or None, details)``, which the
guard calls instead of the array comparison. Every reply, accepted or not, is a row of the audit
log (:func:`fedad.payloads.audit_row`) so that what crossed to the server can be audited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.payloads import AuditLog, audit_row, check_arrays, check_metrics, message_arrays
from strategies.optimizer_state import load_optimizer_state, optimizer_state
from strategies.statistics import strategy_chain

log = logging.getLogger(__name__)


class GuardedStrategy(Strategy):
    """Delegates to ``inner`` after dropping replies that must not reach the global model.

    Args:
        inner: the strategy that aggregates.
        min_replies: a training round with fewer usable replies (sites crashed, timed out or
            were refused) is skipped with an error log line and the global model kept.
    Attributes:
        round_offset: rounds already done before this start (a resumed run), added to the round
            numbers the inner strategy and the sites see, so a resumed run continues the
            numbering (and the sites' seeds) of the interrupted one.
        audit: where the audit rows go (the run's :class:`fedad.payloads.AuditLog`).
    """

    def __init__(self, inner: Strategy, min_replies: int = 1) -> None:
        self.inner = inner
        self.min_replies = min_replies
        self.round_offset = 0
        self.global_arrays: ArrayRecord | None = None
        self.audit = AuditLog()
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        log.info("GuardedStrategy around %s", type(self.inner).__name__)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays (the reference for checks) and delegate."""
        self.global_arrays = arrays
        return self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies, aggregate the rest with the inner strategy, check the result."""
        server_round += self.round_offset
        replies = list(replies)
        kept = self._screen(server_round, replies, check_payload=True)
        usable = sum(not msg.has_error() for msg in kept)
        if usable < self.min_replies:
            failed = [f"{msg.metadata.src_node_id}: {msg.error.reason}" for msg in kept
                      if msg.has_error()]
            log.error("round %d skipped: %d of %d sites sent a usable update (min-train-nodes=%d)"
                      "; global model kept. Failures: %s", server_round, usable, len(replies),
                      self.min_replies, "; ".join(failed) or "none")
            self.last_train_metrics = None
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is not None and self.global_arrays is not None:
            # a model update must match the global model; other results (D-ADDA's generators)
            # are checked for finiteness only
            reference = arrays if hasattr(self.inner, "check_reply") else self.global_arrays
            reason = check_arrays(arrays, reference)
            if reason:
                log.error("round %d: aggregate refused (%s); global model kept",
                          server_round, reason)
                arrays = None
        self.last_train_metrics = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config,
                                             grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Drop replies with non-finite metrics, aggregate the rest."""
        server_round += self.round_offset
        kept = self._screen(server_round, replies, check_payload=False)
        self.last_evaluate_metrics = self.inner.aggregate_evaluate(server_round, kept)
        return self.last_evaluate_metrics

    def state_dict(self) -> dict:
        """State of the wrapped strategies that keep any (by class name), for checkpoints:
        fedad's own (``state_dict``) and Flower's server-optimizer buffers and DP clipping
        norm (:mod:`strategies.optimizer_state`)."""
        state = {}
        for part in strategy_chain(self.inner):
            own = part.state_dict() if hasattr(part, "state_dict") else optimizer_state(part)
            if own:
                state[type(part).__name__] = own
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output into the same chain of strategies."""
        for part in strategy_chain(self.inner):
            own = state.get(type(part).__name__)
            if own is None:
                continue
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(own)
            else:
                load_optimizer_state(part, own)

    @property
    def client_weights(self) -> list[dict]:
        """Per-round, per-client aggregation weights of an adaptive strategy (else empty)."""
        return next((list(part.weight_log) for part in strategy_chain(self.inner)
                     if hasattr(part, "weight_log")), [])

    def _screen(
        self, server_round: int, replies: Iterable[Message], *, check_payload: bool
    ) -> list[Message]:
        """Accepted replies in an order fixed by their content (so that floating-point
        aggregation does not depend on arrival order), then error replies."""
        kept: list[tuple[str, Message]] = []
        errors = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                errors.append(msg)  # the inner strategy logs and skips error replies
                self.audit.append(audit_row(
                    server_round=server_round, node=node, kind=msg.metadata.message_type,
                    accepted=False, reason=f"site error: {msg.error.reason}"))
                continue
            reason, details = self._refusal(msg.content, check_payload)
            if reason:
                log.warning("round %d: refused reply from node %d: %s", server_round, node, reason)
            row = audit_row(server_round=server_round, node=node, kind=msg.metadata.message_type,
                            accepted=not reason, reason=reason or "",
                            arrays=message_arrays(msg), **details)
            self.audit.append(row)
            if reason:
                continue
            metrics = sorted((k, str(v)) for r in msg.content.metric_records.values()
                             for k, v in r.items())
            kept.append((f"{row['digest'] or ''}{metrics}", msg))
        return [msg for _, msg in sorted(kept, key=lambda pair: pair[0])] + errors

    def _refusal(self, content, check_payload: bool) -> tuple[str | None, dict]:
        """Why a reply must not be used (or None), and what the audit row should add."""
        for metrics in content.metric_records.values():
            reason = check_metrics(metrics)
            if reason:
                return reason, {}
        if not check_payload:
            return None, {}
        if hasattr(self.inner, "check_reply"):
            return self.inner.check_reply(content)
        if self.global_arrays is None:
            return None, {}
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}", {}
        return check_arrays(next(iter(content.array_records.values())), self.global_arrays), {}

