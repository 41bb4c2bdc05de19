"""A real Flower simulation (`flwr run`) of the memory-bank head: 2 sites, 2 rounds."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fedad.data import generate_dataset
from fedad.simulation import run_simulation, stop_local_superlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_memorybank_runs_through_flwr_run(tmp_path):
    results = tmp_path / "results"
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], num_train=10,
                            num_test_good=3, num_test_per_defect=2)
    run = run_simulation(
        PROJECT_ROOT,
        num_supernodes=2,
        run_config={"method": "memorybank", "num-server-rounds": 2, "image-size": 64,
                    "num-prototypes": 8, "results-dir": str(results),
                    "plot-every-round": False, "data-path": str(data), "category": "washer"},
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
    )
    assert run.completed, f"status {run.status}\n{run.log[-4000:]}"
    assert stop_local_superlink(tmp_path / "flwr-home") == [], "SuperLink left running"
    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["pixel_auroc"].between(0, 1).all()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["method"] == "memorybank" and summary["num_clients"] == 2
    rows = [json.loads(line) for line in (results / "payloads.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"feature-moments", "prototypes", "cluster-stats",
                                         "normal-map", "score-moments", "score-range",
                                         "score-histogram"}
    assert [r["round"] for r in rows if r["kind"] == "feature-moments"] == [0, 0]
    assert all(r["accepted"] for r in rows)
    assert (results / "plots" / "anomaly_maps.png").is_file()
