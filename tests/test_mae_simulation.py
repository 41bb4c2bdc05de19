"""A real `flwr run` simulation of method=mae: 2 sites, 2 rounds (pre-training, fine-tuning)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fedad.data import generate_dataset
from fedad.simulation import run_simulation, stop_local_superlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_site_mae_simulation_pretrains_then_finetunes_and_averages_thresholds(tmp_path):
    results = tmp_path / "results"
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=12,
                            num_test_good=3, num_test_per_defect=2)
    run = run_simulation(
        PROJECT_ROOT,
        num_supernodes=2,
        run_config={
            "method": "mae", "num-server-rounds": 2, "local-epochs": 1,
            "max-train-batches": 1, "batch-size": 4, "image-size": 64, "backbone": "none",
            "results-dir": str(results), "plot-every-round": False, "data-path": str(data),
            "category": "washer", "mae-pretrain-rounds": 1, "mae-embed-dim": 32,
            "mae-depth": 1, "mae-heads": 2, "mae-decoder-dim": 16, "mae-decoder-depth": 1,
            "mae-decoder-heads": 2,
        },
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert run.completed, f"status {run.status}\n{run.log[-4000:]}"
    assert stop_local_superlink(tmp_path / "flwr-home") == [], "SuperLink left running"
    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    assert rounds["train_pretraining"].tolist() == [1.0, 0.0]
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert rounds[metric].between(0, 1).all(), rounds[metric]
    assert (rounds["train_pixel_threshold"] > 0).all()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["method"] == "mae" and summary["num_clients"] == 2
