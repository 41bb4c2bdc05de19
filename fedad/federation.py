"""The server workflow of methods trained as one federated model (MSVT, MAE, and D-ADDA's
detector stage): the registry's strategy behind the reply guard, global evaluation on the test
split after every round, on the :class:`fedad.server_run.ServerRun` skeleton."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from fedad.config import ExperimentConfig
from fedad.models import load_trainable_state_dict, trainable_state_dict
from fedad.seeding import seed_everything
from fedad.server_run import ServerRun
from fedad.task import arrays_to_model, build_model, evaluate_model, model_to_arrays
from strategies import GuardedStrategy, build_strategy

log = logging.getLogger(__name__)

RoundMetrics = Callable[[nn.Module], dict[str, float]]
"""(global model after a round) -> extra metrics for that round's row (D-ADDA's class accuracy)."""


def train_global_model(run: ServerRun, round_metrics: RoundMetrics | None = None,
                       strategy: GuardedStrategy | None = None) -> None:
    """``num-server-rounds`` rounds of the registry's strategy (or of ``strategy``, a guard
    around it) on ``run``; a resumed run continues after its last checkpointed round."""
    cfg = run.cfg
    test_samples = run.test_samples()
    log.info("results: %s | clients: %d | test images: %d", run.root, len(run.nodes),
             len(test_samples))
    seed_everything(cfg.seed)  # the initial global model does not depend on earlier stages
    model = build_model(cfg)
    strategy = strategy or build_strategy(cfg)
    strategy.audit = run.audit
    done, state, strategy_state = run.resume_point()
    if done:
        load_trainable_state_dict(model, state)
        strategy.load_state_dict(strategy_state)
        strategy.round_offset = done

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        absolute_round = done + server_round
        arrays_to_model(model, arrays)
        metrics, predictions = evaluate_model(model, test_samples, cfg, run.data.defect_types)
        row = dict(metrics)
        if round_metrics is not None:
            row.update(round_metrics(model))
        for prefix, record in (("train", strategy.last_train_metrics),
                               ("client", strategy.last_evaluate_metrics)):
            for key, value in (record or {}).items():
                row[key if key.startswith(prefix) else f"{prefix}_{key}"] = value
        run.record_round(absolute_round, row, trainable_state_dict(model),
                         strategy.state_dict(), predictions)
        run.results.write_client_weights(strategy.client_weights)
        return MetricRecord({k: v for k, v in metrics.items() if math.isfinite(v)})

    remaining = cfg.num_server_rounds - done
    if remaining > 0:
        strategy.start(
            grid=run.grid,
            initial_arrays=model_to_arrays(model),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            evaluate_fn=evaluate_global,
        )


def run_federated(grid: Grid, cfg: ExperimentConfig) -> dict:
    """Run ``cfg.num_server_rounds`` rounds and write the results folder; returns the summary."""
    run = ServerRun(grid, cfg)
    train_global_model(run)
    return run.finish()
