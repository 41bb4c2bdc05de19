"""Partitioners and the partition manifest, on hand-made MVTec-style sample lists."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedad.data import ProtocolSplit, Sample, protocol_split
from partitions import (
    COLUMNS,
    PARTITIONERS,
    PartitionError,
    assign_partitions,
    build_manifest,
    partition_samples,
    partition_table,
    read_manifest,
    write_manifest,
)

ROOT = Path("/data/mvtec")
DEFECTS = {"bottle": {"broken": 6, "contamination": 5}, "cable": {"bent_wire": 4, "cut": 6},
           "screw": {"scratch": 5, "thread": 3}}


def _samples(goods: int = 13, defects: dict[str, dict[str, int]] = DEFECTS,
             test_goods: int = 0) -> list[Sample]:
    """Per category ``goods`` train/good and ``test_goods`` test/good images, and the given
    numbers of test images of each defect type, in the MVTec layout under ROOT."""
    samples = []
    for category, types in defects.items():
        for split, defect_type, count in [("train", "good", goods), ("test", "good", test_goods),
                                          *(("test", t, n) for t, n in types.items())]:
            folder = ROOT / category / split / defect_type
            masks = ROOT / category / "ground_truth" / defect_type
            samples += [
                Sample(category, split, defect_type, folder / f"{i:03d}.png",
                       None if defect_type == "good" else masks / f"{i:03d}_mask.png")
                for i in range(count)
            ]
    return samples


def _split(seed: int = 0) -> ProtocolSplit:
    """The MVTec protocol split of a dataset with 4 test/good images per category."""
    return protocol_split(_samples(test_goods=4), seed=seed)


def _counts(samples: list[Sample], parts: np.ndarray, key) -> dict:
    """{key value: Counter(partition -> count)}."""
    counts: dict = {}
    for sample, part in zip(samples, parts, strict=True):
        counts.setdefault(key(sample), Counter())[int(part)] += 1
    return counts


@pytest.mark.parametrize("scheme", ["iid", "label-wise", "dirichlet"])
def test_random_schemes_are_deterministic_and_seed_dependent(scheme: str) -> None:
    samples = _samples()
    first = assign_partitions(samples, scheme, 3, seed=1)
    np.testing.assert_array_equal(first, assign_partitions(samples, scheme, 3, seed=1))
    assert not np.array_equal(first, assign_partitions(samples, scheme, 3, seed=2))


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_every_sample_assigned_once_and_every_client_has_goods(scheme: str) -> None:
    samples = _samples()
    parts = assign_partitions(samples, scheme, 3, seed=0)
    assert parts.shape == (len(samples),)
    assert parts.dtype.kind == "i" and parts.min() >= 0 and parts.max() < 3
    goods = Counter(int(p) for s, p in zip(samples, parts, strict=True) if not s.label)
    assert sorted(goods) == [0, 1, 2]


def test_iid_shares_within_one_per_type() -> None:
    samples = _samples()
    parts = assign_partitions(samples, "iid", 4, seed=3)
    for counts in _counts(samples, parts, lambda s: (s.category, s.defect_type)).values():
        shares = [counts.get(client, 0) for client in range(4)]
        assert max(shares) - min(shares) <= 1
    totals = np.bincount(parts, minlength=4)
    assert totals.max() - totals.min() <= 1


def test_label_wise_one_client_per_defect_type_goods_even() -> None:
    samples = _samples()
    parts = assign_partitions(samples, "label-wise", 4, seed=0)
    by_type = _counts(samples, parts, lambda s: s.defect_type)
    defect_types = sorted(set(by_type) - {"good"})
    for k, name in enumerate(defect_types):
        assert set(by_type[name]) == {k % 4}
    for counts in _counts([s for s in samples if not s.label],
                          parts[[not s.label for s in samples]],
                          lambda s: s.category).values():
        assert max(counts.values()) - min(counts.get(c, 0) for c in range(4)) <= 1


def _mean_max_share(alpha: float, seeds: range) -> float:
    samples = _samples(goods=10, defects={"bottle": {f"type{k}": 40 for k in range(5)}})
    shares = []
    for seed in seeds:
        parts = assign_partitions(samples, "dirichlet", 4, seed=seed, alpha=alpha)
        for name, counts in _counts(samples, parts, lambda s: s.defect_type).items():
            if name != "good":
                shares.append(max(counts.values()) / sum(counts.values()))
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed, even = _mean_max_share(0.1, range(10)), _mean_max_share(100.0, range(10))
    assert skewed > 0.7
    assert even < 0.4
    assert skewed > even


def test_dirichlet_spreads_goods_evenly() -> None:
    samples = _samples()
    parts = assign_partitions(samples, "dirichlet", 3, seed=5, alpha=0.1)
    goods = np.bincount(parts[[not s.label for s in samples]], minlength=3)
    assert goods.max() - goods.min() <= 1


def test_by_category_gives_each_client_one_category() -> None:
    samples = _samples()
    parts = assign_partitions(samples, "by-category", 3, seed=0)
    by_client = _counts(samples, parts, lambda s: s.category)
    assert {c: set(counts) for c, counts in by_client.items()} == {
        "bottle": {0}, "cable": {1}, "screw": {2}
    }
    np.testing.assert_array_equal(parts, assign_partitions(samples, "by-category", 3, seed=9))
    fewer = assign_partitions(samples, "by-category", 2, seed=0)  # round-robin: screw -> 0
    assert {c: set(n) for c, n in _counts(samples, fewer, lambda s: s.category).items()} == {
        "bottle": {0}, "cable": {1}, "screw": {0}
    }


@pytest.mark.parametrize(
    ("scheme", "n", "kwargs", "message"),
    [
        ("shards", 2, {}, r"partitioner='shards'.*iid, label-wise, dirichlet, by-category"),
        ("iid", 0, {}, "num-partitions=0: must be >= 1"),
        ("label-wise", 7, {}, r"num-partitions=7 exceeds the 6 defect types.*bent_wire, broken"),
        ("by-category", 4, {}, r"num-partitions=4 exceeds the 3 categories \(bottle, cable, scr"),
        ("dirichlet", 2, {"alpha": 0.0}, "dirichlet-alpha=0.0 must be > 0"),
        ("iid", 40, {}, r"num-partitions=40 leaves 1 client\(s\) without normal images \(39 in"),
    ],
)
def test_bad_settings_raise_naming_the_setting(scheme: str, n: int, kwargs: dict,
                                               message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        assign_partitions(_samples(), scheme, n, seed=0, **kwargs)


def test_label_wise_without_defects_points_at_use_real_defects() -> None:
    with pytest.raises(PartitionError, match="use-real-defects=true"):
        assign_partitions(_samples(defects={"bottle": {}}), "label-wise", 2, seed=0)


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_manifest_rows_and_determinism(scheme: str) -> None:
    split = _split()
    df = build_manifest(split, scheme, 3, seed=0, root=ROOT)
    pd.testing.assert_frame_equal(df, build_manifest(split, scheme, 3, seed=0, root=ROOT))
    assert tuple(df.columns) == COLUMNS
    assert len(df) == len(split.train) + len(split.test)
    test = df[df["partition"] == -1]
    assert (test["role"] == "test").all() and len(test) == len(split.test)
    assert set(df.loc[df["partition"] >= 0, "role"]) == {"train", "val"}
    assert (df.loc[df["label"] == 0, "mask"] == "").all()
    assert (df.loc[df["label"] == 1, "mask"].str.startswith(tuple(DEFECTS))).all()
    assert df["image"].str.match(r"^(bottle|cable|screw)/(train|test)/").all()


def test_manifest_round_trips_through_csv(tmp_path: Path) -> None:
    df = build_manifest(_split(), "dirichlet", 3, seed=4, root=ROOT)
    write_manifest(df, tmp_path / "partitions.csv")
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "partitions.csv"), df)


def test_val_split_is_stratified_and_non_empty() -> None:
    df = build_manifest(_split(), "iid", 3, seed=0, val_fraction=0.25, root=ROOT)
    for client, rows in df[df["partition"] >= 0].groupby("partition"):
        assert (rows["role"] == "val").sum() == max(1, round(len(rows) * 0.25)), client
        for defect_type, group in rows.groupby("defect_type"):
            val = (group["role"] == "val").sum()
            assert abs(val - len(group) * 0.25) < 1, (client, defect_type)
            assert (group["role"] == "train").any(), (client, defect_type)


def test_val_split_rules_for_small_clients_and_zero_fraction() -> None:
    split = ProtocolSplit(train=_samples(goods=4, defects={"bottle": {}}), test=[])
    assert set(build_manifest(split, "iid", 1, seed=0, root=ROOT)["role"]) == {"train"}
    split = ProtocolSplit(train=_samples(goods=5, defects={"bottle": {}}), test=[])
    assert Counter(build_manifest(split, "iid", 1, seed=0, root=ROOT)["role"]) == {
        "train": 4, "val": 1
    }
    assert set(build_manifest(_split(), "iid", 3, seed=0, val_fraction=0.0)["role"]) == {
        "train", "test"
    }
    with pytest.raises(PartitionError, match=r"val-fraction=1\.0"):
        build_manifest(_split(), "iid", 3, seed=0, val_fraction=1.0)


def test_partition_samples_returns_the_right_samples() -> None:
    split = _split()
    df = build_manifest(split, "label-wise", 3, seed=0, root=ROOT)
    parts = assign_partitions(split.train, "label-wise", 3, seed=0)
    for client in range(3):
        train = partition_samples(df, client, "train", ROOT)
        val = partition_samples(df, client, "val", ROOT)
        expected = [s for s, p in zip(split.train, parts, strict=True) if p == client]
        assert sorted(train + val, key=str) == sorted(expected, key=str)
        assert val and not set(train) & set(val)
    assert partition_samples(df, -1, "test", ROOT) == split.test
    with pytest.raises(PartitionError, match="role='eval'"):
        partition_samples(df, 0, "eval", ROOT)
    with pytest.raises(PartitionError, match="partition-id=3: not in the manifest"):
        partition_samples(df, 3, "train", ROOT)


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "partitions.csv"
    build_manifest(_split(), "iid", 2, seed=0).drop(columns=["role", "mask"]).to_csv(
        path, index=False
    )
    with pytest.raises(PartitionError, match=r"partitions\.csv: manifest lacks column\(s\) role"):
        read_manifest(path)
    with pytest.raises(PartitionError, match=r"missing\.csv: cannot read manifest"):
        read_manifest(tmp_path / "missing.csv")


def test_partition_table_counts() -> None:
    df = build_manifest(_split(), "label-wise", 3, seed=0, root=ROOT)
    table = partition_table(df)
    assert list(table.index) == ["0", "1", "2", "test"]
    defect_types = sorted({t for types in DEFECTS.values() for t in types})
    assert list(table.columns) == ["good", *defect_types, "total", "val"]
    assert table["total"].sum() == len(df)
    assert table.loc["test", "val"] == 0
    assert table["val"].sum() == (df["role"] == "val").sum()
    assert table.loc["0", "bent_wire"] == (df["defect_type"] == "bent_wire").sum() - table.loc[
        "test", "bent_wire"]
