"""One registry of server strategies: Flower's built-ins by name, each wrapped in the guard.

Strategy parameters come from the experiment config (run-config keys listed in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedad.config import ConfigError, ExperimentConfig
from strategies.guard import GuardedStrategy

StrategyFactory = Callable[[ExperimentConfig, dict], Strategy]

STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": lambda cfg, common: FedAvg(**common),
    "fedprox": lambda cfg, common: FedProx(**common, proximal_mu=cfg.proximal_mu),
    "fedadam": lambda cfg, common: FedAdam(**common, **_server_lr(cfg, "eta")),
    "fedyogi": lambda cfg, common: FedYogi(**common, **_server_lr(cfg, "eta")),
    "fedavgm": lambda cfg, common: FedAvgM(
        **common, **_server_lr(cfg, "server_learning_rate"), server_momentum=cfg.server_momentum
    ),
    "fedmedian": lambda cfg, common: FedMedian(**common),
    "fedtrimmedavg": lambda cfg, common: FedTrimmedAvg(**common, beta=cfg.trim_beta),
    "krum": lambda cfg, common: Krum(**common, num_malicious_nodes=cfg.num_malicious_nodes),
}


def _server_lr(cfg: ExperimentConfig, name: str) -> dict[str, float]:
    """``server-lr`` under the strategy's own parameter name; 0 keeps Flower's default."""
    return {name: cfg.server_lr} if cfg.server_lr > 0 else {}


def list_strategies() -> list[str]:
    """Names accepted by ``strategy``."""
    return sorted(STRATEGIES)


def build_strategy(cfg: ExperimentConfig) -> GuardedStrategy:
    """The strategy named by ``cfg.strategy``, wrapped so bad replies never reach the model."""
    factory = STRATEGIES.get(cfg.strategy)
    if factory is None:
        raise ConfigError(
            f"strategy={cfg.strategy!r}: expected one of {', '.join(list_strategies())}"
        )
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0 if cfg.val_fraction > 0 else 0.0,  # no local val: no client eval
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_train_nodes,
        "min_available_nodes": cfg.min_train_nodes,
    }
    return GuardedStrategy(factory(cfg, common))
