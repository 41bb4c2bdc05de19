"""Per-method site logic: what a client does in each phase of a method."""

from __future__ import annotations

from clients.msvt import MSVTClient
from fedad.config import ExperimentConfig
from fedad.experiment import prepare_data

CLIENTS = {"msvt": MSVTClient}


def create_client(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> MSVTClient:
    """The site object of ``cfg.method`` for one partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id}: must be in [0, num-partitions={num_partitions})"
        )
    data = prepare_data(cfg, num_partitions)
    return CLIENTS[cfg.method](cfg, data, partition_id)
