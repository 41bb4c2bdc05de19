"""Contrastive Feature Alignment (Fed-MSVT eq. 7), the server side.

Each round the sites train with the InfoNCE term of fedad/train/contrastive.py and reply their
normal-feature prototype (a single L2-normalised vector, ``prototype`` metric). The server keeps
the latest prototype of every site (by partition) and broadcasts them all as anchors with the
next round's training config; each site uses the anchors of the *other* sites as positives.
Only these few vectors cross, never features or images (the guard refuses long metric lists).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.msvt import protocol
from strategies.statistics import StatisticsStrategy, reply_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CFASettings:
    """Run-config section of CFA: ``cfa-weight`` (lambda) and ``cfa-tau`` (temperature)."""

    cfa_weight: float = 0.1
    """Weight lambda of the InfoNCE alignment term in local training."""
    cfa_tau: float = 0.1
    """Temperature tau of the InfoNCE term."""

    def __post_init__(self) -> None:
        if not self.cfa_weight >= 0:
            raise ValueError(f"cfa-weight={self.cfa_weight}: must be >= 0")
        if not self.cfa_tau > 0:
            raise ValueError(f"cfa-tau={self.cfa_tau}: must be > 0")


class ContrastiveAlignment(StatisticsStrategy):
    """Adds CFA's settings and anchors to every training config; collects prototypes."""

    def __init__(self, inner: Strategy, settings: CFASettings) -> None:
        super().__init__(inner)
        self.settings = settings
        self.anchors: dict[int, np.ndarray] = {}

    def summary(self) -> None:
        """Log the settings, then the inner strategy's summary."""
        log.info("Contrastive Feature Alignment: %s", self.settings)
        self.inner.summary()

    def anchor_config(self) -> dict:
        """Training-config entries: lambda, tau, and the anchors [C, D] flattened with their
        partitions (absent before any site has sent a prototype)."""
        config = {protocol.CFA_WEIGHT: self.settings.cfa_weight,
                  protocol.CFA_TAU: self.settings.cfa_tau, protocol.SEND_PROTOTYPE: True}
        if self.anchors:
            partitions = sorted(self.anchors)
            stacked = np.stack([self.anchors[p] for p in partitions])
            config.update({protocol.CFA_ANCHORS: stacked.ravel().tolist(),
                           protocol.CFA_ANCHOR_PARTITIONS: partitions,
                           protocol.CFA_ANCHOR_DIM: int(stacked.shape[1])})
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, with CFA's entries in the config."""
        merged = ConfigRecord({**dict(config), **self.anchor_config()})
        return self.inner.configure_train(server_round, arrays, merged, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each site's prototype for the next round, then aggregate with the inner one."""
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            metrics = reply_metrics(msg)
            prototype = metrics.get(protocol.PROTOTYPE)
            if prototype is None or protocol.PARTITION not in metrics:
                log.warning("round %d: node %d sent no prototype", server_round,
                            msg.metadata.src_node_id)
                continue
            vector = np.asarray(prototype, dtype=np.float32)
            if self.anchors and vector.shape != next(iter(self.anchors.values())).shape:
                log.warning("round %d: node %d prototype of shape %s refused", server_round,
                            msg.metadata.src_node_id, vector.shape)
                continue
            self.anchors[int(metrics[protocol.PARTITION])] = vector
        return self.inner.aggregate_train(server_round, self.inward(replies))

    def state_dict(self) -> dict:
        """What a resumed server needs: the latest prototype of every site."""
        return {"anchors": {p: v.tolist() for p, v in self.anchors.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.anchors = {int(p): np.asarray(v, np.float32) for p, v in state["anchors"].items()}
