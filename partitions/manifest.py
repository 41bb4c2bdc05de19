"""The partition manifest: one row per sample of the dataset, saved as partitions.csv.

Columns: partition (-1 for the server's test split), role (train | val | test), category,
defect_type, label, image, mask (empty for normal images). Paths are relative to the dataset root.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedad.data import ProtocolSplit, Sample
from partitions.schemes import PartitionError, assign_partitions

COLUMNS = ("partition", "role", "category", "defect_type", "label", "image", "mask")


def _rows(samples: Sequence[Sample], partitions: np.ndarray, roles: Sequence[str],
          root: Path | None) -> list[dict]:
    def rel(path: Path | None) -> str:
        if path is None:
            return ""
        return str(path.relative_to(root)) if root else str(path)

    return [
        {"partition": int(p), "role": role, "category": s.category,
         "defect_type": s.defect_type, "label": s.label, "image": rel(s.image_path),
         "mask": rel(s.mask_path)}
        for s, p, role in zip(samples, partitions, roles, strict=True)
    ]


def _validation_roles(samples: Sequence[Sample], partitions: np.ndarray, val_fraction: float,
                      seed: int) -> list[str]:
    """Per client, a stratified (by defect type) ``val_fraction`` of its samples becomes val."""
    roles = ["train"] * len(samples)
    if val_fraction <= 0:
        return roles
    rng = np.random.default_rng(seed + 7919)
    for client in np.unique(partitions):
        members = np.flatnonzero(partitions == client)
        if len(members) < 5:
            continue
        by_type: dict[str, list[int]] = {}
        for i in members:
            by_type.setdefault(samples[i].defect_type, []).append(i)
        chosen = []
        for name in sorted(by_type):
            group = rng.permutation(by_type[name])
            take = int(np.floor(len(group) * val_fraction + rng.random()))
            chosen.extend(group[: min(take, len(group) - 1)] if name != "good" else group[:take])
        if not chosen:
            goods = rng.permutation(by_type.get("good", members.tolist()))
            chosen = [goods[0]]
        for i in chosen:
            roles[i] = "val"
    return roles


def build_manifest(
    split: ProtocolSplit,
    scheme: str,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    val_fraction: float = 0.15,
    root: Path | None = None,
) -> pd.DataFrame:
    """Partition ``split.train`` among clients (with local val splits) and add the test split.

    Returns:
        DataFrame with :data:`COLUMNS`, train-pool rows first, then test rows (partition -1).
    """
    partitions = assign_partitions(split.train, scheme, num_partitions, seed, alpha)
    roles = _validation_roles(split.train, partitions, val_fraction, seed)
    rows = _rows(split.train, partitions, roles, root)
    rows += _rows(split.test, np.full(len(split.test), -1), ["test"] * len(split.test), root)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Save as CSV."""
    df.to_csv(path, index=False)


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest CSV; a missing file or column raises PartitionError naming the file."""
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except OSError as err:
        raise PartitionError(f"{path}: cannot read manifest ({err})") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise PartitionError(f"{path}: manifest lacks columns {', '.join(missing)}")
    return df


def partition_samples(df: pd.DataFrame, partition_id: int, role: str, root: Path) -> list[Sample]:
    """Samples of one client's role, or of the test split (partition -1, role "test")."""
    rows = df[(df["partition"] == partition_id) & (df["role"] == role)]
    return [
        Sample(
            category=r.category,
            split=Path(r.image).parts[1],  # <category>/<split>/<type>/<file>
            defect_type=r.defect_type,
            image_path=Path(root) / r.image,
            mask_path=Path(root) / r.mask if r.mask else None,
        )
        for r in rows.itertuples()
    ]


def partition_table(df: pd.DataFrame) -> pd.DataFrame:
    """Counts by defect type per client (rows 0..n-1, then 'test'); columns types, total, val."""
    named = df.assign(client=df["partition"].map(lambda p: "test" if p < 0 else str(p)))
    table = pd.crosstab(named["client"], named["defect_type"])
    table["total"] = table.sum(axis=1)
    table["val"] = named[named["role"] == "val"].groupby("client").size()
    table["val"] = table["val"].fillna(0).astype(int)
    order = sorted((c for c in table.index if c != "test"), key=int) + ["test"]
    return table.reindex([c for c in order if c in table.index])
