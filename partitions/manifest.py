"""The partition manifest: one row per sample of the dataset, saved as partitions.csv.

Columns: partition (-1 for the server's test split), role (train | val | test), category,
defect_type, label, image, mask (empty for normal images). Paths are relative to the dataset
root when one is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedad.data import ProtocolSplit, Sample
from fedad.data.mvtec import GOOD
from partitions.schemes import PartitionError, assign_partitions

COLUMNS = ("partition", "role", "category", "defect_type", "label", "image", "mask")
ROLES = ("train", "val", "test")
TEST_PARTITION = -1
MIN_SAMPLES_FOR_VAL = 5  # smaller clients keep every sample for training
_DTYPES = {"partition": "int64", "role": str, "category": str, "defect_type": str,
           "label": "int64", "image": str, "mask": str}


def _frame(samples: Sequence[Sample], partitions: np.ndarray, root: Path | None) -> pd.DataFrame:
    """Manifest rows [M] of ``samples``, every role "train" for now."""
    def rel(path: Path | None) -> str:
        if path is None:
            return ""
        return str(path.relative_to(root) if root is not None else path)

    rows = [(int(p), "train", s.category, s.defect_type, s.label, rel(s.image_path),
             rel(s.mask_path)) for s, p in zip(samples, partitions, strict=True)]
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(_DTYPES)


def _val_counts(sizes: np.ndarray, is_good: np.ndarray, val_fraction: float) -> np.ndarray:
    """How many samples of each defect type [T] of one client become val.

    A largest-remainder share of round(total * val_fraction), at least one in all; every type
    keeps one sample for training unless that is the only way to get a val sample (then a
    defect type gives up its only sample, never the normal images).
    """
    exact = sizes * val_fraction
    room = np.maximum(sizes - 1, 0)
    counts = np.minimum(np.floor(exact).astype(np.int64), room)
    missing = max(1, round(float(exact.sum()))) - counts.sum()
    by_remainder = [t for t in np.argsort(-(exact - counts), kind="stable") if counts[t] < room[t]]
    counts[by_remainder[:missing]] += 1
    if counts.sum() == 0:
        counts[np.lexsort((is_good, -sizes))[0]] = 1  # largest type, a defect one on ties
    return counts


def _validation_roles(train: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """Roles [M] of the train pool: per client, a stratified ``val_fraction`` becomes "val"."""
    roles = train["role"].copy()
    if val_fraction == 0:
        return roles
    for client, rows in train.groupby("partition"):
        if len(rows) < MIN_SAMPLES_FOR_VAL:
            continue
        by_type = rows.groupby("defect_type").indices  # name -> positions in rows, sorted names
        names = sorted(by_type)
        sizes = np.asarray([len(by_type[name]) for name in names])
        counts = _val_counts(sizes, np.asarray([name == GOOD for name in names]), val_fraction)
        rng = np.random.default_rng([seed, int(client)])
        for name, count in zip(names, counts, strict=True):
            chosen = rng.permutation(by_type[name])[:count]
            roles.loc[rows.index[chosen]] = "val"
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

    Args:
        split: the protocol split; ``split.train`` [M] is partitioned, ``split.test`` [T] is
            the server's test split.
        scheme, num_partitions, seed, alpha: as :func:`partitions.assign_partitions`.
        val_fraction: share of each client's samples, stratified by defect type, held out as
            its local validation ("val"; at least one sample for clients with >= 5 samples).
        root: dataset root; paths are stored relative to it when given.
    Returns:
        DataFrame [M + T] with :data:`COLUMNS`: train-pool rows in ``split.train`` order, then
        test rows (partition -1, role "test"). Identical for identical inputs.
    """
    if not 0 <= val_fraction < 1:
        raise PartitionError(f"val-fraction={val_fraction}: must be in [0, 1)")
    train = _frame(split.train, assign_partitions(split.train, scheme, num_partitions, seed,
                                                  alpha), root)
    train["role"] = _validation_roles(train, val_fraction, seed)
    test = _frame(split.test, np.full(len(split.test), TEST_PARTITION), root).assign(role="test")
    return pd.concat([train, test], ignore_index=True)


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Save a manifest as CSV (no index)."""
    df.to_csv(path, index=False)


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest CSV; an unreadable file or missing column raises PartitionError naming
    the file."""
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PartitionError(f"{path}: cannot read manifest ({err})") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise PartitionError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    try:
        return df.astype(_DTYPES)
    except ValueError as err:
        raise PartitionError(f"{path}: partition and label must be integers ({err})") from err


def partition_samples(df: pd.DataFrame, partition_id: int, role: str, root: Path) -> list[Sample]:
    """Samples of one client's role (``partition_id`` in [0, n)), or the server's test split
    (``partition_id`` -1, role "test"), with paths under ``root``; in manifest order."""
    if role not in ROLES:
        raise PartitionError(f"role={role!r}: expected one of {', '.join(ROLES)}")
    if partition_id not in set(df["partition"]):
        raise PartitionError(
            f"partition-id={partition_id}: not in the manifest "
            f"(partitions {sorted(int(p) for p in set(df['partition']) - {TEST_PARTITION})}, "
            f"test {TEST_PARTITION})"
        )
    rows = df[(df["partition"] == partition_id) & (df["role"] == role)]
    return [
        Sample(
            category=r.category,
            split=Path(r.image).parent.parent.name,  # <category>/<split>/<type>/<file>
            defect_type=r.defect_type,
            image_path=Path(root) / r.image,
            mask_path=Path(root) / r.mask if r.mask else None,
        )
        for r in rows.itertuples()
    ]


def partition_table(df: pd.DataFrame) -> pd.DataFrame:
    """Sample counts per client: rows "0".."n-1" then "test"; columns good, each defect type
    (sorted), total, and val (how many of the client's samples are its validation split)."""
    client = df["partition"].map(lambda p: "test" if p == TEST_PARTITION else str(p))
    table = pd.crosstab(client.rename("client"), df["defect_type"])
    defect_types = sorted(c for c in table.columns if c != GOOD)
    table = table.reindex(columns=[GOOD, *defect_types], fill_value=0)
    table["total"] = table.sum(axis=1)
    table["val"] = (df["role"] == "val").groupby(client).sum()
    clients = sorted((c for c in table.index if c != "test"), key=int)
    table = table.reindex([*clients, "test"] if "test" in table.index else clients)
    table.columns.name = None
    return table
