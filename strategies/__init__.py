"""Server strategies: a registry of Flower's built-ins, each behind a reply guard."""

from strategies.guard import GuardedStrategy
from strategies.registry import build_strategy, list_strategies

__all__ = ["GuardedStrategy", "build_strategy", "list_strategies"]
