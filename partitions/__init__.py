"""Partitioners (IID, label-wise, Dirichlet, by-category) and the partition manifest."""

from partitions.manifest import (
    COLUMNS,
    ROLES,
    TEST_PARTITION,
    build_manifest,
    partition_samples,
    partition_table,
    read_manifest,
    write_manifest,
)
from partitions.schemes import PARTITIONERS, PartitionError, assign_partitions

__all__ = [
    "COLUMNS", "PARTITIONERS", "ROLES", "TEST_PARTITION", "PartitionError", "assign_partitions",
    "build_manifest", "partition_samples", "partition_table", "read_manifest", "write_manifest",
]
