"""The one server skeleton that every method's workflow runs on.

A :class:`ServerRun` owns what every run does the same way: the results folder (resolved
config, partition manifest, rounds.csv, checkpoints, plots, summary.json written once at the
end), the data and its test split, the connected nodes, broadcasting a message to every node,
the audit log of what crossed (:data:`fedad.payloads.AUDIT_FILE`, one row schema), per-round
recording (metrics row, checkpoint, scores, plots, log line) and resume: with ``resume-from``
the run checks that the config is the interrupted run's, then hands the workflow the state of
the last finished round (:meth:`ServerRun.resume_point`) and of the last finished stage
(:meth:`ServerRun.load_stage`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import Sample
from fedad.experiment import ExperimentData, prepare_data
from fedad.payloads import AUDIT_FILE, AuditLog, Query, audit_row, message_arrays
from fedad.results import ResultsWriter, atomic_write
from fedad.seeding import seed_everything
from fedad.thresholds import SCALES, federated_thresholds
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)

AUDIT_POSITION = "audit_rows"
"""Checkpoint key: how many audit rows the run had written when the checkpoint was taken (the
rows after it, up to a ``resume`` row, are the interrupted attempt's)."""
RESUME_KIND = "resume"
"""Audit kind of the row a resumed run writes for each checkpoint it restores (node 0: the
server itself)."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected (raises TimeoutError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of min-train-nodes={minimum} nodes connected")
        time.sleep(1.0)
    return nodes


def check_resume_config(cfg: ExperimentConfig, saved_path: Path) -> None:
    """A resumed run must use the interrupted run's config (the sites build their models and
    partitions from the run-config they receive); ConfigError naming every differing key.
    Where and how fast it computes (``device``, ``precision``, ``num-threads``) may change."""
    if not saved_path.is_file():
        raise ConfigError(f"resume-from={cfg.resume_from!r}: {saved_path} not found")
    saved = ExperimentConfig.from_yaml(saved_path).to_dict()
    current = cfg.to_dict()
    ignored = {"resume-from", "results-dir", "device", "precision", "num-threads"}
    differ = sorted(k for k in set(saved) | set(current) - ignored
                    if k not in ignored and saved.get(k) != current.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ConfigError(
            f"resume-from={cfg.resume_from!r}: pass the interrupted run's run-config again "
            f"(from {saved_path}) plus resume-from; differing keys: {changes}"
        )


class ServerRun:
    """One run's server side, shared by every method (see the module docstring).

    Args:
        grid: the Flower grid (or :class:`fedad.inprocess.InProcessGrid`).
        cfg: the experiment config.
    Attributes:
        nodes: the connected node ids, sorted.
        data: the resolved dataset and partition manifest.
        results: the results folder writer.
        audit: the audit log of what crossed to the server.
    """

    def __init__(self, grid: Grid, cfg: ExperimentConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.results = ResultsWriter(cfg.resolved_results_dir(), resume=self.resuming)
        if self.resuming:
            check_resume_config(cfg, self.results.root / "config.yaml")
            if not any(self.results.checkpoints.glob("*.pt")):
                raise ConfigError(
                    f"resume-from={cfg.resume_from!r}: no checkpoint in "
                    f"{self.results.checkpoints} (the run was stopped before its first one); "
                    "start it again without resume-from")
        seed_everything(cfg.seed)
        self.nodes = sorted(wait_for_nodes(grid, cfg.min_train_nodes))
        self.data: ExperimentData = prepare_data(cfg, len(self.nodes))
        self.results.write_setup(cfg, self.data.manifest)
        self.audit = AuditLog(self.results.root / AUDIT_FILE, resume=self.resuming)
        self.started = time.perf_counter()

    @property
    def resuming(self) -> bool:
        """True for a run given ``resume-from``."""
        return bool(self.cfg.resume_from)

    @property
    def root(self) -> Path:
        """The results folder."""
        return self.results.root

    def test_samples(self) -> list[Sample]:
        """The test split (never seen by any site)."""
        return self.data.samples(-1, "test")

    def broadcast(self, message_type: str, content: RecordDict, group: int = 0,
                  nodes: Sequence[int] | None = None) -> list[Message]:
        """Send a copy of ``content`` to every node (or to ``nodes``); the replies sorted by
        node id (errors included: the caller audits them)."""
        messages = [self.grid.create_message(RecordDict(dict(content.items())), message_type,
                                             node, str(group))
                    for node in (self.nodes if nodes is None else nodes)]
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

    def query_sites(self, query: Query, content: RecordDict, required: bool = True
                    ) -> list[dict]:
        """Send ``query`` to every site and audit the replies (their metrics only cross); the
        replies' metrics by node. With ``required``, RuntimeError naming the nodes that failed
        (they could not go on to the next stage); otherwise failed nodes are left out."""
        rows, failed = [], []
        for reply in self.broadcast(query.message, content):
            node = reply.metadata.src_node_id
            error = reply.error.reason if reply.has_error() else ""
            self.audit.append(audit_row(server_round=0, node=node, kind=query.kind,
                                        accepted=not error,
                                        reason=error and f"site error: {error}",
                                        arrays=message_arrays(reply)))
            if error:
                failed.append(f"node {node}: {error}")
            else:
                rows.append({"node": node, **dict(reply.content["metrics"])})
        if failed and required:
            raise RuntimeError(f"{query.message} failed on " + "; ".join(failed))
        return rows

    def resume_point(self) -> tuple[int, dict[str, torch.Tensor], dict]:
        """(rounds done, global state dict, strategy state) of the last round checkpoint, with
        rounds.csv rolled back to it; (0, {}, {}) for a fresh run or a resumed run that had not
        finished a round."""
        if not self.resuming or not (self.results.checkpoints / "latest.pt").exists():
            return 0, {}, {}
        done, state, strategy_state = self.results.load_latest()
        self._audit_resume(done, "latest.pt", strategy_state.pop(AUDIT_POSITION))
        log.info("resuming after round %d from %s", done, self.root)
        return done, state, strategy_state

    def record_round(self, server_round: int, metrics: dict[str, float],
                     state: dict[str, torch.Tensor], strategy_state: dict | None = None,
                     predictions: Predictions | None = None) -> None:
        """Everything one finished round leaves: its rounds.csv row and checkpoint (with the
        audit position), the test scores, the plots and a log line."""
        self.results.record_round(server_round, metrics, state,
                                  {**(strategy_state or {}), AUDIT_POSITION: len(self.audit)})
        if predictions is not None:
            self.results.write_scores(predictions, self.data.defect_types)
            if self.cfg.plot_every_round or server_round == self.cfg.num_server_rounds:
                self.results.plot(server_round, predictions)
        log.info("round %d global: %s", server_round,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                          if isinstance(v, int | float)))

    def _stage_path(self, name: str) -> Path:
        return self.results.checkpoints / f"stage-{name}.pt"

    def save_stage(self, name: str, state: dict[str, Any]) -> None:
        """Checkpoint a finished stage (tensors and plain values), with the audit position."""
        atomic_write(self._stage_path(name), lambda path: torch.save(
            {**state, AUDIT_POSITION: len(self.audit)}, path))

    def load_stage(self, name: str) -> dict[str, Any] | None:
        """The state :meth:`save_stage` wrote for ``name`` in the interrupted run; None for a
        fresh run or a stage not finished."""
        path = self._stage_path(name)
        if not self.resuming or not path.exists():
            return None
        state = torch.load(path, weights_only=True)
        self._audit_resume(0, path.name, state.pop(AUDIT_POSITION))
        log.info("stage %s: restored from %s", name, path)
        return state

    def _audit_resume(self, server_round: int, checkpoint: str, position: int) -> None:
        """The audit row that marks where a resumed run takes over."""
        self.audit.append(audit_row(
            server_round=server_round, node=0, kind=RESUME_KIND, accepted=True,
            checkpoint=checkpoint, rows_before_checkpoint=int(position)))

    def finish(self, extra: dict[str, Any] | None = None,
               final: dict[str, float] | None = None) -> dict:
        """Decide the decision thresholds on the last round's global model with the sites
        (:func:`fedad.thresholds.federated_thresholds`: thresholds.json), then write
        summary.json once (``final`` adds to the last round's metrics) and return it."""
        thresholds = federated_thresholds(self)
        decided = {} if thresholds is None else {"thresholds": {
            "threshold_fpr": thresholds["threshold_fpr"],
            **{scale: thresholds[scale]["threshold"] for scale in SCALES}}}
        summary = self.results.write_summary(
            self.cfg, len(self.nodes), {"results_dir": str(self.root), **decided,
                                        **(extra or {})}, final)
        log.info("summary: %s", summary)
        return summary

