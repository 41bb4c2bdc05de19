"""Server workflow of the feature heads: fit/refine rounds over Flower messages, checked
payloads, merge, calibration, global evaluation on the test split, on the
:class:`fedad.server_run.ServerRun` skeleton.

With ``feature-whitening`` (default), a first exchange asks every site for the moments of its
normal patch features and pools them into the global whitening, which every later message
carries (:mod:`fedad.heads.whitening`). Round 1 asks every site for its own head (one-shot
federation); rounds 2.. send the global head and merge the sites' refinement replies. After
each round, with ``map-baseline`` (default), the sites send the mean anomaly map of their normal
images under the new global head, from which the server takes the border artefact that every
map is scored against (:func:`fedad.heads.scoring.map_baseline`); then they send score
moments for calibration. Every payload is checked (kind, names, shapes, finiteness, count)
before use; a refused or failed reply is logged and left out; every reply is a row of the run's
audit log. Each round's checkpoint holds the global head, the whitening, the map baseline and
the calibration, so a killed run resumes after its last finished round.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedad.config import ConfigError, ExperimentConfig
from fedad.heads.base import FeatureHead
from fedad.heads.payload import Payload, PayloadError, attach_arrays, payload_from_record
from fedad.heads.protocol import (
    FEATURE_MOMENTS,
    NORMAL_MAP,
    SCORE_MOMENTS,
    WHITENING_MATRIX,
    WHITENING_MEAN,
)
from fedad.heads.registry import extractor_for, head_for, head_settings
from fedad.heads.scoring import (
    BASELINE_RECORD,
    PatchSet,
    ScoreScale,
    anomaly_maps,
    extract_patches,
    image_scores,
    map_baseline,
)
from fedad.heads.whitening import Whitening
from fedad.metrics import anomaly_metrics
from fedad.payloads import SERVER_ROUND, audit_row, check_metrics
from fedad.server_run import ServerRun
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)


class HeadRound:
    """One round's exchange with the sites through the run's broadcast and audit log."""

    def __init__(self, run: ServerRun, head: FeatureHead) -> None:
        self.run, self.cfg, self.head = run, run.cfg, head
        self.whitening: Whitening | None = None

    def _send(self, message_type: str, content: RecordDict, server_round: int) -> list[Message]:
        content["config"] = ConfigRecord({SERVER_ROUND: server_round})
        if self.whitening is not None:
            self.whitening.add_to(content)
        return self.run.broadcast(message_type, content, server_round)

    def collect(self, server_round: int, global_head: Payload | None) -> list[Payload]:
        """Send ``train`` (with the global head from round 2 on); the accepted payloads."""
        kind = self.head.fit_kind if global_head is None else self.head.refine_kind
        content = global_head.to_record() if global_head is not None else RecordDict()
        return self._accepted("train", content, kind, server_round)

    def agree_whitening(self) -> Whitening:
        """The global whitening from the sites' feature moments (logged as round 0)."""
        payloads = self._accepted(FEATURE_MOMENTS.message, RecordDict(), FEATURE_MOMENTS.kind, 0)
        if not payloads:
            raise RuntimeError("whitening: no site sent usable feature moments")
        self.whitening = Whitening.from_moments(payloads)
        log.info("whitening agreed from %d sites' feature moments", len(payloads))
        return self.whitening

    def agree_baseline(self, server_round: int, global_head: Payload) -> np.ndarray:
        """The map baseline [S, S] from the sites' normal maps under ``global_head``."""
        payloads = self._accepted(NORMAL_MAP.message, global_head.to_record(), NORMAL_MAP.kind,
                                  server_round)
        if not payloads:
            raise RuntimeError(f"round {server_round}: no site sent a usable normal map")
        return map_baseline(payloads)

    def _accepted(self, message_type: str, content: RecordDict, kind: str,
                  server_round: int) -> list[Payload]:
        """Send ``content`` to every site; their replies of ``kind`` that pass the checks."""
        accepted = []
        for reply in self._send(message_type, content, server_round):
            row = {"server_round": server_round, "node": reply.metadata.src_node_id,
                   "kind": kind}
            if reply.has_error():
                row.update(accepted=False, reason=f"site error: {reply.error.reason}")
            elif ("head" not in reply.content.array_records
                  and reply.content.metric_records.get("metrics", {}).get("num-examples") == 0):
                row.update(accepted=False, reason="abstained: no normal training images")
            else:
                try:
                    payload = payload_from_record(
                        reply.content, kind, {**self.head.sizes, "S": self.cfg.image_size},
                        self.head.reference_shapes(kind))
                except PayloadError as err:
                    row.update(accepted=False, reason=str(err))
                else:
                    accepted.append(payload)
                    row.update(accepted=True, arrays=payload.arrays, count=payload.count)
            if not row["accepted"]:
                log.warning("round %d: refused node %s: %s", server_round, row["node"],
                            row["reason"])
            self.run.audit.append(audit_row(**row))
        return accepted

    def calibrate(self, server_round: int, global_head: Payload,
                  baseline: np.ndarray | None = None) -> ScoreScale:
        """Send ``evaluate`` with the global head (and the map baseline [S, S] if any); pool
        the sites' normal-score moments."""
        content = global_head.to_record()
        if baseline is not None:
            attach_arrays(content, BASELINE_RECORD, {"mean": baseline})
        moments = []
        for reply in self._send("evaluate", content, server_round):
            record = None if reply.has_error() else reply.content.metric_records.get("metrics")
            reason = ("site error" if record is None else check_metrics(record)
                      or (None if record.get("count", 0) > 0 else "no normal images"))
            if reason is None:
                moments.append(dict(record))
            self.run.audit.append(audit_row(
                server_round=server_round, node=reply.metadata.src_node_id, kind=SCORE_MOMENTS,
                accepted=reason is None, reason=reason or "",
                count=None if record is None else int(record.get("count", 0))))
        if not moments:
            raise RuntimeError(f"round {server_round}: no site reported score moments")
        return ScoreScale.from_moments(moments)


def evaluate_head(head: FeatureHead, payload: Payload, test: PatchSet, scale: ScoreScale,
                  cfg: ExperimentConfig, baseline: np.ndarray | None = None,
                  whitening: Whitening | None = None) -> tuple[dict[str, float], Predictions]:
    """Metrics (of the raw maps and scores) and calibrated predictions of the global head on the
    test patches (whitened by ``whitening`` if given; maps less ``baseline`` [S, S] if given)."""
    settings = head_settings(cfg)
    maps = anomaly_maps(head, payload, test.features, cfg.image_size,
                        settings.sigma(cfg.method, cfg.image_size),
                        baseline, whitening)
    raw_scores = image_scores(maps, settings)
    calibrated_maps, scores = scale.apply(maps, raw_scores)
    predictions = Predictions(test.labels, test.defect_classes, scores, test.masks,
                              calibrated_maps, test.images, raw_scores).check()
    # rank metrics on the raw values: the logistic saturates to exactly 1.0 far above the
    # threshold (e.g. on a category the sites never saw), which would tie every image there
    return anomaly_metrics(test.labels, raw_scores, test.masks, maps), predictions


def _round_state(global_head: Payload, whitening: Whitening | None,
                 baseline: np.ndarray | None) -> dict[str, torch.Tensor]:
    """The checkpoint of a round: the global head's arrays, the whitening and map baseline."""
    state = {k: torch.from_numpy(v.copy()) for k, v in global_head.arrays.items()}
    if whitening is not None:
        state[WHITENING_MEAN] = torch.from_numpy(whitening.mean.copy())
        state[WHITENING_MATRIX] = torch.from_numpy(whitening.matrix.copy())
    if baseline is not None:
        state["map_baseline"] = torch.from_numpy(baseline)
    return state


def restore_head(state: dict[str, torch.Tensor], strategy_state: dict
                 ) -> tuple[Payload, Whitening | None]:
    """The global head and whitening of a checkpoint written with :func:`_round_state`."""
    arrays = {k: v.numpy() for k, v in state.items()}
    arrays.pop("map_baseline", None)
    whitening = None
    if WHITENING_MEAN in arrays:
        whitening = Whitening(arrays.pop(WHITENING_MEAN), arrays.pop(WHITENING_MATRIX))
    return Payload(strategy_state["kind"], arrays, int(strategy_state["count"])), whitening


def run_feature_head(grid: Grid, cfg: ExperimentConfig) -> dict:
    """Run ``cfg.num_server_rounds`` rounds of a feature head (one for a head that does not
    refine, e.g. padim); returns the summary."""
    settings = head_settings(cfg)
    if settings.bank_clustering == "coreset":
        raise ConfigError("bank-clustering='coreset' sends patch features (its prototypes are "
                          "patches): a centralized baseline only (bench/heads.py)")
    run = ServerRun(grid, cfg)
    test_samples = run.test_samples()
    if settings.target_category:
        if settings.target_category not in run.data.categories:
            raise ConfigError(f"target-category={settings.target_category!r}: not among the "
                              f"run's categories {run.data.categories}")
        test_samples = [s for s in test_samples if s.category == settings.target_category]
    started = time.perf_counter()
    test = extract_patches(extractor_for(cfg), test_samples, cfg.image_size,
                           run.data.defect_types, precision=cfg.precision)
    log.info("results: %s | sites: %d | test images: %d (features in %.1f s)", run.root,
             len(run.nodes), len(test_samples), time.perf_counter() - started)
    head = head_for(cfg)
    exchange = HeadRound(run, head)
    global_head: Payload | None = None
    done, state, strategy_state = run.resume_point()
    if done:
        global_head, exchange.whitening = restore_head(state, strategy_state)
    elif settings.feature_whitening:
        exchange.agree_whitening()
    rounds = cfg.num_server_rounds if head.refines else 1
    if rounds < cfg.num_server_rounds:
        log.info("%s: exact in one round; rounds 2-%d would rebuild the same head: skipped",
                 cfg.method, cfg.num_server_rounds)
    for server_round in range(done + 1, rounds + 1):
        payloads = exchange.collect(server_round, global_head)
        if len(payloads) < min(cfg.min_train_nodes, len(run.nodes)):
            log.error("round %d: %d usable replies < min-train-nodes=%d; round skipped",
                      server_round, len(payloads), cfg.min_train_nodes)
            continue
        global_head = (head.merge(payloads) if global_head is None
                       else head.refine(global_head, payloads))
        baseline = (exchange.agree_baseline(server_round, global_head)
                    if settings.map_baseline else None)
        scale = exchange.calibrate(server_round, global_head, baseline)
        metrics, predictions = evaluate_head(head, global_head, test, scale, cfg, baseline,
                                             exchange.whitening)
        run.record_round(server_round, {**metrics, "train_sites": float(len(payloads))},
                         _round_state(global_head, exchange.whitening, baseline),
                         {"scale": vars(scale), "kind": global_head.kind,
                          "count": global_head.count}, predictions)
    if global_head is None:
        raise RuntimeError("no round produced a global head (see the refused replies above)")
    return run.finish({"head": cfg.method})
