"""Server side of a run: data, strategy, per-round global evaluation, results folder."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedad.config import ConfigError, ExperimentConfig
from fedad.experiment import prepare_data
from fedad.models import load_trainable_state_dict, trainable_state_dict
from fedad.results import ResultsWriter
from fedad.seeding import seed_everything
from fedad.task import arrays_to_model, build_model, evaluate_model, model_to_arrays
from strategies import build_strategy

log = logging.getLogger(__name__)


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
    partitions from the run-config they receive); ConfigError naming every differing key."""
    if not saved_path.is_file():
        raise ConfigError(f"resume-from={cfg.resume_from!r}: {saved_path} not found")
    saved = ExperimentConfig.from_yaml(saved_path).to_dict()
    current = cfg.to_dict()
    ignored = {"resume-from", "results-dir"}
    differ = sorted(k for k in set(saved) | set(current) - ignored
                    if k not in ignored and saved.get(k) != current.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise ConfigError(
            f"resume-from={cfg.resume_from!r}: pass the interrupted run's run-config again "
            f"(from {saved_path}) plus resume-from; differing keys: {changes}"
        )


def run_federated(grid: Grid, cfg: ExperimentConfig) -> dict:
    """Run ``cfg.num_server_rounds`` rounds and write the results folder; returns the summary."""
    results = ResultsWriter(cfg.resolved_results_dir(), resume=bool(cfg.resume_from))
    if cfg.resume_from:
        check_resume_config(cfg, results.root / "config.yaml")
    seed_everything(cfg.seed)
    num_clients = len(wait_for_nodes(grid, cfg.min_train_nodes))
    data = prepare_data(cfg, num_clients)
    results.write_setup(cfg, data.manifest)
    test_samples = data.samples(-1, "test")
    log.info("results: %s | clients: %d | test images: %d", results.root, num_clients,
             len(test_samples))

    model = build_model(cfg)
    strategy = build_strategy(cfg)
    done = 0
    if cfg.resume_from:
        done, state, strategy_state = results.load_latest()
        load_trainable_state_dict(model, state)
        strategy.load_state_dict(strategy_state)
        strategy.round_offset = done
        strategy.payload_log = results.read_jsonl("payloads.jsonl")
        log.info("resuming after round %d from %s", done, results.root)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        absolute_round = done + server_round
        arrays_to_model(model, arrays)
        metrics, predictions = evaluate_model(model, test_samples, cfg, data.defect_types)
        row = dict(metrics)
        for prefix, record in (("train", strategy.last_train_metrics),
                               ("client", strategy.last_evaluate_metrics)):
            for key, value in (record or {}).items():
                row[key if key.startswith(prefix) else f"{prefix}_{key}"] = value
        results.record_round(absolute_round, row, trainable_state_dict(model),
                             strategy.state_dict())
        results.write_scores(predictions, data.defect_types)
        results.write_client_weights(strategy.client_weights)
        if cfg.plot_every_round or absolute_round == cfg.num_server_rounds:
            results.plot(absolute_round, predictions)
        results.write_jsonl("payloads.jsonl", strategy.payload_log)
        log.info("round %d global: %s", absolute_round,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return MetricRecord({k: v for k, v in metrics.items() if math.isfinite(v)})

    remaining = cfg.num_server_rounds - done
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=model_to_arrays(model),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            evaluate_fn=evaluate_global,
        )
    summary = results.write_summary(cfg, num_clients, {"results_dir": str(results.root)})
    log.info("summary: %s", summary)
    return summary
