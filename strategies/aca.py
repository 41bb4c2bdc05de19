"""Adaptive Client Aggregation (Fed-MSVT eqs. 3-6) around any FedAvg-family Flower strategy.

w_i = q_i s_i d_i / sum_j q_j s_j d_j  (eq. 3; d_i optional, off by default), then
theta^t = sum_i w_i theta_i^t (eq. 6) computed by the wrapped Flower strategy: ACA puts w_i in
each reply's metrics under ``aca-weight`` and the inner strategy is built with
``weighted_by_key="aca-weight"``, so FedAvg averages with these weights and FedAvgM, FedAdam,
FedYogi apply their server optimizer to that average; FedProx's proximal term acts on the sites.

- q_i: a validation metric of the site's locally trained model on its own held-out validation
  split (clients/model.py), chosen by ``aca-quality-metric``: ``pixel-ap`` (the default),
  ``pixel-auroc``, ``image-auroc``, or the paper's eq. 4 ``pixel-accuracy``, (TP + TN) / all
  pixels at the decision threshold 0.5. Pixel accuracy is dominated by the true negatives of
  small defects (0.93-1.00 at every site of the label-wise benchmarks, so the weights were
  uniform); average precision is not. A site whose split cannot define the metric (no defect
  pixels) gets the mean q of the round's other sites, and the log says so.
- s_i (eq. 5): 1 / Var(theta_i^t - theta_i^{t-1}) over all trainable parameters, with
  theta_i^{t-1} the site's previous reply, kept on the server per node id. In a site's first
  round, theta_i^{t-1} is the global model it started from (so s_i measures its local update).
  The variance is floored at ``aca-variance-floor``.
- d_i: (1 + cos(p_i, p)) / 2 between the site's normal-feature prototype p_i and the
  sample-weighted mean p of all prototypes of the round.

Options: ``aca-count-mix`` m mixes with sample-count weights, w <- (1 - m) w + m n_i / sum n;
``aca-floor`` f keeps every valid site at weight >= f, w <- (1 - N f) w + f. A reply without a
finite, positive q_i, s_i or d_i gets weight 0 and the reason is logged; if no reply has a
positive weight the round's aggregate is skipped and the global model kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.msvt import protocol
from strategies.statistics import StatisticsStrategy, reply_metrics, with_metrics

log = logging.getLogger(__name__)

WEIGHT_KEY = "aca-weight"
QUALITY_METRICS = {"pixel-ap": protocol.VAL_PIXEL_AP, "pixel-auroc": protocol.VAL_PIXEL_AUROC,
                   "image-auroc": protocol.VAL_IMAGE_AUROC,
                   "pixel-accuracy": protocol.VAL_PIXEL_ACCURACY}
"""aca-quality-metric values -> the reply metric that is q_i."""


@dataclass(frozen=True)
class ACASettings:
    """Run-config section of ACA (keys ``aca-*``)."""

    aca_quality: bool = True
    """Weigh a site by q_i, a metric of its local model on its own validation split."""
    aca_quality_metric: str = "pixel-ap"
    """q_i: pixel-ap, pixel-auroc, image-auroc or pixel-accuracy (the paper's eq. 4)."""
    aca_stability: bool = True
    """Weigh a site by s_i, 1 / variance of its update (eq. 5)."""
    aca_domain: bool = False
    """Weigh a site by d_i, the cosine of its prototype to the mean one."""
    aca_count_mix: float = 0.0
    """Share m of sample-count weights mixed in: w <- (1 - m) w + m n_i / sum n."""
    aca_floor: float = 0.0
    """Minimum weight f of every valid site: w <- (1 - N f) w + f."""
    aca_variance_floor: float = 1e-12
    """Floor of the update variance in s_i."""

    def __post_init__(self) -> None:
        if self.aca_quality_metric not in QUALITY_METRICS:
            raise ValueError(f"aca-quality-metric={self.aca_quality_metric!r}: must be one of "
                             f"{', '.join(QUALITY_METRICS)}")
        if not 0.0 <= self.aca_count_mix <= 1.0:
            raise ValueError(f"aca-count-mix={self.aca_count_mix}: must be in [0, 1]")
        if not 0.0 <= self.aca_floor < 1.0:
            raise ValueError(f"aca-floor={self.aca_floor}: must be in [0, 1)")
        if not self.aca_variance_floor > 0:
            raise ValueError(f"aca-variance-floor={self.aca_variance_floor}: must be > 0")


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """All floating-point tensors of a payload as one float64 vector [P]."""
    parts = [a.numpy().ravel() for a in arrays.values() if a.numpy().dtype.kind == "f"]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def combine_weights(
    raw: np.ndarray, counts: np.ndarray, count_mix: float, floor: float
) -> np.ndarray:
    """Normalised weights [N] from raw scores q s d [N] (0 = excluded) and sample counts [N]."""
    valid = raw > 0
    weights = np.zeros_like(raw, dtype=np.float64)
    if not valid.any():
        return weights
    weights[valid] = raw[valid] / raw[valid].sum()
    if count_mix > 0:
        share = np.where(valid, counts, 0.0)
        weights = (1 - count_mix) * weights + count_mix * share / share.sum()
    n = int(valid.sum())
    floor = min(floor, 1.0 / n)
    weights[valid] = (1 - n * floor) * weights[valid] + floor
    return weights


class AdaptiveClientAggregation(StatisticsStrategy):
    """ACA around ``inner``, a FedAvg-family strategy built with ``weighted_by_key="aca-weight"``.

    Attributes:
        weight_log: one row per reply and round: round, node, partition, num_examples, q, s, d,
            weight, reason (why a weight is 0).
    """

    def __init__(self, inner: Strategy, settings: ACASettings) -> None:
        super().__init__(inner)
        if getattr(inner, "weighted_by_key", WEIGHT_KEY) != WEIGHT_KEY:
            raise ValueError(f"ACA needs the inner strategy built with "
                             f"weighted_by_key={WEIGHT_KEY!r}")
        self.settings = settings
        self.history: dict[int, np.ndarray] = {}
        self.global_vector: np.ndarray | None = None
        self.weight_log: list[dict] = []

    def summary(self) -> None:
        """Log the settings, then the inner strategy's summary."""
        log.info("Adaptive Client Aggregation: %s", self.settings)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sites for q_i (and prototypes when d_i is on); remember the global model."""
        self.global_vector = flatten(arrays)
        extra = dict(config)
        if self.settings.aca_quality:
            extra[protocol.REPORT_VALIDATION] = True
        if self.settings.aca_domain:
            extra[protocol.SEND_PROTOTYPE] = True
        return self.inner.configure_train(server_round, arrays, ConfigRecord(extra), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weigh each reply by eq. (3) and let the inner strategy average with the weights."""
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return self.inner.aggregate_train(server_round, replies)
        weights = self.client_weights(server_round, valid)
        weighted = [with_metrics(m, MetricRecord({**reply_metrics(m), WEIGHT_KEY: float(w)}))
                    for m, w in zip(valid, weights, strict=True) if w > 0]
        if not weighted:
            log.error("round %d: no reply has a positive ACA weight; global model kept",
                      server_round)
            return None, None
        return self.inner.aggregate_train(server_round, self.inward(weighted))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Client evaluation metrics averaged by sample count (the inner strategy reads its
        weights from ``aca-weight``)."""
        weighted = [m if m.has_error() else with_metrics(m, MetricRecord(
            {**reply_metrics(m), WEIGHT_KEY: float(reply_metrics(m).get("num-examples", 0))}))
            for m in replies]
        return self.inner.aggregate_evaluate(server_round, weighted)

    def client_weights(self, server_round: int, replies: list[Message]) -> np.ndarray:
        """w_i [N] of eq. (3) for ``replies`` (updates the per-node history; logs each row)."""
        rows = [self._factors(server_round, m) for m in replies]
        _fill_undefined_quality(server_round, rows)
        if self.settings.aca_domain:
            self._domain_factors(rows)
        raw = np.array([r["q"] * r["s"] * r["d"] if not r["reason"] else 0.0 for r in rows])
        raw[~np.isfinite(raw)] = 0.0
        counts = np.array([float(r["num_examples"]) for r in rows])
        weights = combine_weights(raw, counts, self.settings.aca_count_mix, self.settings.aca_floor)
        for row, weight in zip(rows, weights, strict=True):
            row.pop("prototype", None)
            row.pop("q_undefined", None)
            row["weight"] = float(weight)
            if weight == 0 and not row["reason"]:
                row["reason"] = "q*s*d not finite and positive"
            if row["reason"]:
                log.warning("round %d: node %d gets ACA weight 0 (%s)", server_round,
                            row["node"], row["reason"])
            self.weight_log.append(row)
        log.info("round %d ACA weights: %s", server_round,
                 " ".join(f"{r['node']}:{r['weight']:.3f}" for r in rows))
        return weights

    def _factors(self, server_round: int, msg: Message) -> dict:
        metrics = reply_metrics(msg)
        node = msg.metadata.src_node_id
        row = {"round": server_round, "node": node,
               "partition": int(metrics.get(protocol.PARTITION, -1)),
               "num_examples": float(metrics.get("num-examples", 0)), "q": 1.0, "s": 1.0,
               "d": 1.0, "reason": "", "prototype": metrics.get(protocol.PROTOTYPE)}
        if self.settings.aca_quality:
            key = QUALITY_METRICS[self.settings.aca_quality_metric]
            q = float(metrics.get(key, float("nan")))
            row["q"] = q
            if q == protocol.UNDEFINED:
                row["q_undefined"] = True
            elif not (np.isfinite(q) and q > 0):
                row["reason"] = f"no valid {key} ({q})"
        vector = flatten(next(iter(msg.content.array_records.values())))
        if self.settings.aca_stability:
            reference = self.history.get(node, self.global_vector)
            if reference is None or reference.shape != vector.shape:
                reference = np.zeros_like(vector)
            variance = float(np.var(vector - reference))
            row["s"] = 1.0 / max(variance, self.settings.aca_variance_floor)
            if not np.isfinite(row["s"]):
                row["reason"] = row["reason"] or "non-finite update variance"
        if np.isfinite(vector).all():
            self.history[node] = vector.astype(np.float32)
        return row

    @staticmethod
    def _domain_factors(rows: list[dict]) -> None:
        """d_i = (1 + cos(p_i, p)) / 2 with p the count-weighted mean prototype of the round."""
        have = [r for r in rows if r["prototype"] is not None and not r["reason"]]
        for row in rows:
            if row["prototype"] is None and not row["reason"]:
                row["reason"] = "no prototype for d_i"
        if not have:
            return
        protos = np.array([r["prototype"] for r in have], dtype=np.float64)
        counts = np.array([r["num_examples"] for r in have])
        center = (protos * counts[:, None]).sum(0) / max(counts.sum(), 1e-12)
        for row, proto in zip(have, protos, strict=True):
            denominator = np.linalg.norm(proto) * np.linalg.norm(center)
            cos = float(proto @ center / denominator) if denominator > 0 else float("nan")
            row["d"] = (1.0 + cos) / 2.0
            if not (np.isfinite(row["d"]) and row["d"] > 0):
                row["reason"] = f"invalid d_i ({row['d']})"

    def state_dict(self) -> dict:
        """What a resumed server needs: the per-node history and the weight log."""
        return {"history": {node: torch.from_numpy(v) for node, v in self.history.items()},
                "weight_log": list(self.weight_log)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.history = {int(k): torch.as_tensor(v).numpy().astype(np.float32)
                        for k, v in state["history"].items()}
        self.weight_log = list(state["weight_log"])


def _fill_undefined_quality(server_round: int, rows: list[dict]) -> None:
    """Rows whose split could not define q_i get the mean q of the others (or 1 if none)."""
    undefined = [r for r in rows if r.get("q_undefined")]
    if not undefined:
        return
    defined = [r["q"] for r in rows if not r.get("q_undefined") and not r["reason"]]
    fill = float(np.mean(defined)) if defined else 1.0
    for row in undefined:
        row["q"] = fill
        log.info("round %d: node %d's validation split cannot define q_i: the others' mean "
                 "%.3f is used", server_round, row["node"], fill)
