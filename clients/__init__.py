"""Per-method site logic: what a client does in each phase of a method (one thin module per
method: unpack the message, call the method's package, pack the reply). The custom message
actions each method's site handles are named by its registry entry
(:func:`fedad.methods.site_actions`)."""

from __future__ import annotations

from clients.base import SiteClient
from fedad.config import ExperimentConfig
from fedad.experiment import prepare_data
from fedad.methods import method_entry, resolve


def create_client(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> SiteClient:
    """The site object of ``cfg.method`` for one partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id}: must be in [0, num-partitions={num_partitions})"
        )
    data = prepare_data(cfg, num_partitions)
    return resolve(method_entry(cfg.method).client)(cfg, data, partition_id)
