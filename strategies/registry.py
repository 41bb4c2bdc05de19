"""One registry of server strategies: Flower's built-ins and Fed-MSVT's by name, each wrapped
in the guard.

``aca`` (Adaptive Client Aggregation), ``cfa`` (Contrastive Feature Alignment) and ``fedmsvt``
(both) wrap the Flower strategy named by ``base-strategy`` (fedavg, fedprox, fedavgm, fedadam,
fedyogi), so Flower's server optimizers and FedProx's proximal term compose with them.
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
from fedad.privacy import wrap_with_privacy
from strategies.aca import WEIGHT_KEY, ACASettings, AdaptiveClientAggregation
from strategies.cfa import CFASettings, ContrastiveAlignment
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


BASE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
FED_MSVT_STRATEGIES = {"aca": ("aca",), "cfa": ("cfa",), "fedmsvt": ("aca", "cfa")}
"""Fed-MSVT strategies and the mechanisms they stack (innermost first) on the base strategy."""


def _server_lr(cfg: ExperimentConfig, name: str) -> dict[str, float]:
    """``server-lr`` under the strategy's own parameter name; 0 keeps Flower's default."""
    return {name: cfg.server_lr} if cfg.server_lr > 0 else {}


def list_strategies() -> list[str]:
    """Names accepted by ``strategy``."""
    return sorted([*STRATEGIES, *FED_MSVT_STRATEGIES])


def build_strategy(cfg: ExperimentConfig) -> GuardedStrategy:
    """The strategy named by ``cfg.strategy``, wrapped so bad replies never reach the model."""
    if cfg.strategy not in list_strategies():
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
    mechanisms = FED_MSVT_STRATEGIES.get(cfg.strategy, ())
    if not mechanisms:
        return GuardedStrategy(wrap_with_privacy(STRATEGIES[cfg.strategy](cfg, common), cfg),
                               cfg.min_train_nodes)
    if cfg.base_strategy not in BASE_STRATEGIES:
        raise ConfigError(f"base-strategy={cfg.base_strategy!r}: expected one of "
                          f"{', '.join(BASE_STRATEGIES)}")
    if "aca" in mechanisms:
        common["weighted_by_key"] = WEIGHT_KEY
    strategy = STRATEGIES[cfg.base_strategy](cfg, common)
    if "aca" in mechanisms:
        strategy = AdaptiveClientAggregation(strategy, cfg.section(ACASettings))
    if "cfa" in mechanisms:
        strategy = ContrastiveAlignment(strategy, cfg.section(CFASettings))
    return GuardedStrategy(wrap_with_privacy(strategy, cfg), cfg.min_train_nodes)
