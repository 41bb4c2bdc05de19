"""A real `flwr run` simulation of method=nexvitad: 3 by-category sites (two source categories
and the target), 2 rounds (pre-training, joint training), then the memory bank on the trained
encoder."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fedad.data import generate_dataset
from fedad.simulation import run_simulation, stop_local_superlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_three_site_nexvitad_simulation_trains_the_encoder_then_fills_the_bank(tmp_path):
    results = tmp_path / "results"
    data = generate_dataset(tmp_path / "mvtec", categories=["brick", "washer", "wood"],
                            num_train=6, num_test_good=2, num_test_per_defect=1, image_size=64)
    run = run_simulation(
        PROJECT_ROOT,
        num_supernodes=3,
        run_config={
            "method": "nexvitad", "partitioner": "by-category", "category": "brick,washer,wood",
            "target-category": "wood", "num-server-rounds": 2, "local-epochs": 1,
            "max-train-batches": 1, "batch-size": 4, "image-size": 64, "val-fraction": 0.0,
            "results-dir": str(results), "plot-every-round": False, "data-path": str(data),
            "min-train-nodes": 3, "nexvitad-dino": "none", "nexvitad-dino-size": 28,
            "nexvitad-decoder-channels": "8,8,8", "num-prototypes": 8,
            "bank-clustering": "kmeans", "max-patches": 2000,
        },
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert run.completed, f"status {run.status}\n{run.log[-4000:]}"
    assert stop_local_superlink(tmp_path / "flwr-home") == [], "SuperLink left running"
    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    assert rounds["train_pretraining"].tolist() == [1.0, 0.0]
    assert rounds["target_image_auroc"].between(0, 1).all()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["method"] == "nexvitad" and summary["num_clients"] == 3
    assert 0 <= summary["final"]["image_auroc"] <= 1
    assert (results / "checkpoints" / "encoder.pt").is_file()
    bank = [json.loads(line) for line in
            (results / "bank" / "payloads.jsonl").read_text().splitlines()]
    assert sum(r["accepted"] for r in bank if r["kind"] == "prototypes") == 1
