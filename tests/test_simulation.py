"""A real Flower simulation (`flwr run`, Ray backend): 2 clients, 2 rounds of a tiny config,
on a folder in the MVTec AD layout given by `data-path`."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fedad.data import generate_dataset
from fedad.metrics import METRIC_NAMES
from fedad.simulation import federation_config, run_simulation, stop_local_superlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_client_two_round_simulation_completes_and_writes_results(tmp_path):
    results = tmp_path / "results"
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=12,
                            num_test_good=4, num_test_per_defect=3)
    run = run_simulation(
        PROJECT_ROOT,
        num_supernodes=2,
        run_config={
            "num-server-rounds": 2, "local-epochs": 1, "max-train-batches": 2,
            "batch-size": 8, "image-size": 64, "results-dir": str(results),
            "plot-every-round": False, "data-path": str(data), "category": "washer",
        },
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert run.completed, f"status {run.status}\n{run.log[-4000:]}"
    assert stop_local_superlink(tmp_path / "flwr-home") == [], "SuperLink left running"

    for name in ("config.yaml", "partitions.csv", "rounds.csv", "summary.json", "payloads.jsonl",
                 "defect_types.csv", "checkpoints/round-001.pt", "checkpoints/round-002.pt",
                 "plots/metrics_per_round.png", "plots/anomaly_maps.png"):
        assert (results / name).is_file(), f"{name} missing from {results}"

    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    for metric in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_f1_max"):
        assert metric in METRIC_NAMES
        assert rounds[metric].between(0, 1).all(), rounds[metric]
    assert "train_loss" in rounds and "client_val_pixel_accuracy" in rounds

    summary = json.loads((results / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["rounds"] == 2
    assert summary["method"] == "msvt" and summary["strategy"] == "fedavg"
    assert summary["final"]["image_auroc"] == pytest.approx(rounds["image_auroc"].iloc[-1])

    manifest = pd.read_csv(results / "partitions.csv")
    assert set(manifest["partition"]) == {-1, 0, 1} and set(manifest["category"]) == {"washer"}
    crossings = [json.loads(line) for line in (results / "payloads.jsonl").read_text().splitlines()]
    assert {c["node"] for c in crossings if c["kind"] == "train"} and all(
        c["accepted"] for c in crossings)


@pytest.mark.slow
def test_three_client_fedmsvt_simulation_weighs_clients_and_aligns_features(tmp_path):
    results = tmp_path / "results"
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=18,
                            num_test_good=4, num_test_per_defect=3)
    run = run_simulation(
        PROJECT_ROOT,
        num_supernodes=3,
        run_config={
            "strategy": "fedmsvt", "num-server-rounds": 2, "local-epochs": 1,
            "max-train-batches": 2, "batch-size": 8, "image-size": 64, "backbone": "none",
            "results-dir": str(results), "plot-every-round": False, "data-path": str(data),
            "category": "washer", "val-fraction": 0.3,
        },
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert run.completed, f"status {run.status}\n{run.log[-4000:]}"
    weights = pd.read_csv(results / "aggregation_weights.csv")
    assert sorted(weights["round"].unique()) == [1, 2] and len(weights) == 6
    per_round = weights.groupby("round")["weight"].sum()
    assert per_round.round(6).eq(1.0).all() and (weights["weight"] > 0).all()
    assert weights["q"].between(0, 1).all() and (weights["s"] > 0).all()
    assert set(weights["partition"]) == {0, 1, 2}
    assert (results / "plots" / "aggregation_weights.png").is_file()
    rounds = pd.read_csv(results / "rounds.csv")
    assert (rounds["train_extra_loss"] > 0).all()  # the InfoNCE term was trained with


def test_federation_config_reserves_cpus_and_fractional_gpus_per_site():
    assert federation_config(3, 2) == "num-supernodes=3 client-resources-num-cpus=2"
    assert federation_config(4, 1, 0.25) == ("num-supernodes=4 client-resources-num-cpus=1 "
                                             "client-resources-num-gpus=0.25")
    for bad in ((0, 1, 0.0), (2, 0, 0.0), (2, 1, -0.5)):
        with pytest.raises(ValueError, match="client-resources-num-gpus"):
            federation_config(*bad)
