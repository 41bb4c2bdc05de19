"""The data side of one experiment: dataset root, categories, protocol split and partition manifest.

The server and every client call :func:`prepare_data` with the same config and get the same
manifest, so a site never needs the server to tell it which files are its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import (
    DEFAULT_CATEGORY,
    Sample,
    ensure_synthetic,
    list_categories,
    protocol_split,
    scan_category,
)
from partitions import build_manifest, partition_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentData:
    """Resolved dataset and its partition manifest (one row per sample, see partitions/)."""

    root: Path
    categories: tuple[str, ...]
    defect_types: tuple[str, ...]
    manifest: pd.DataFrame
    num_partitions: int

    def samples(self, partition_id: int, role: str) -> list[Sample]:
        """Samples of one client's ``role`` ("train" | "val"), or the test split (-1, "test")."""
        return partition_samples(self.manifest, partition_id, role, self.root)


def resolve_root(cfg: ExperimentConfig) -> Path:
    """The dataset root: ``data-path``, or the built-in synthetic data (generated once, cached)."""
    if cfg.data_path:
        return Path(cfg.data_path).expanduser().resolve()
    return ensure_synthetic(seed=0)


def resolve_categories(cfg: ExperimentConfig, root: Path) -> tuple[str, ...]:
    """Categories named by ``category`` (comma-separated, or ``all``); default: one category.

    The ``by-category`` partitioner needs several categories; with an empty ``category`` it uses
    every category found under ``root``.
    """
    available = list_categories(root)
    if not available:
        raise ConfigError(f"data-path={str(root)!r}: no category folders with train/ and test/")
    if cfg.category in ("", "all"):
        if cfg.category == "all" or cfg.partitioner == "by-category":
            return tuple(available)
        default = DEFAULT_CATEGORY if DEFAULT_CATEGORY in available else available[0]
        return (default,)
    names = tuple(c.strip() for c in cfg.category.split(",") if c.strip())
    missing = [c for c in names if c not in available]
    if missing:
        raise ConfigError(
            f"category={cfg.category!r}: {', '.join(missing)} not found under {root} "
            f"(available: {', '.join(available)})"
        )
    return names


def dataset_categories(data_path: str, names: Sequence[str] | None = None
                       ) -> tuple[Path, tuple[str, ...]]:
    """The root of ``data_path`` (the built-in synthetic data when empty) and the categories
    ``names`` in it (every one when None or empty), by :func:`resolve_root` and
    :func:`resolve_categories`; ConfigError naming a missing folder or category."""
    cfg = ExperimentConfig(data_path=data_path, category=",".join(names or ()) or "all")
    root = resolve_root(cfg)
    return root, resolve_categories(cfg, root)


@functools.lru_cache(maxsize=8)
def prepare_data(cfg: ExperimentConfig, num_partitions: int) -> ExperimentData:
    """Scan, split by the MVTec protocol and partition deterministically (cached per process)."""
    root = resolve_root(cfg)
    categories = resolve_categories(cfg, root)
    samples = [s for c in categories for s in scan_category(root, c)]
    fraction = 1 / 3 if cfg.use_real_defects else 0.0
    split = protocol_split(samples, seed=cfg.seed, defect_train_fraction=fraction)
    manifest = build_manifest(
        split,
        cfg.partitioner,
        num_partitions,
        seed=cfg.seed,
        alpha=cfg.dirichlet_alpha,
        val_fraction=cfg.val_fraction,
        root=root,
    )
    defect_types = ("good", *sorted({s.defect_type for s in samples} - {"good"}))
    log.info(
        "data: %s categories=%s samples=%d partitions=%d",
        root, ",".join(categories), len(samples), num_partitions,
    )
    return ExperimentData(root, categories, defect_types, manifest, num_partitions)
