"""Fault tolerance of the server workflow: crashed or silent sites, and a results folder whose
rounds.csv lags its checkpoint (in-process grid: the real server and site code). A server
killed midway and resumed: tests/test_resume.py."""

import logging

import pandas as pd
import pytest
import torch

import fedad.inprocess
from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.federation import run_federated
from fedad.inprocess import InProcessGrid, run_in_process
from fedad.results import ResultsWriter


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=18, num_test_good=3, num_test_per_defect=2)


def _cfg(data_path, results, **changes):
    return ExperimentConfig.from_run_config({
        "data-path": str(data_path), "category": "washer", "image-size": 64, "backbone": "none",
        "local-epochs": 1, "max-train-batches": 1, "batch-size": 8, "num-server-rounds": 3,
        "results-dir": str(results), "plot-every-round": False, "val-fraction": 0.3,
        "min-train-nodes": 2, **changes})


@pytest.fixture
def crashing_site(monkeypatch):
    """Partition 1 raises in every message, as a crashed ClientApp does."""
    real = fedad.inprocess.create_client

    def create(cfg, partition_id, num_partitions):
        if partition_id == 1:
            raise RuntimeError("site 1 crashed")
        return real(cfg, partition_id, num_partitions)

    monkeypatch.setattr(fedad.inprocess, "create_client", create)


def test_a_round_completes_with_the_sites_that_replied(data_path, tmp_path, crashing_site):
    summary = run_in_process(_cfg(data_path, tmp_path, strategy="aca"), 3)
    assert summary["rounds"] == 3
    weights = pd.read_csv(tmp_path / "aggregation_weights.csv")
    assert set(weights["partition"]) == {0, 2}  # the crashed site is in no aggregate
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds["image_auroc"].nunique() > 1  # the global model moved


class _SilentGrid(InProcessGrid):
    """Only the first site answers training messages (the others time out)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        training = messages and messages[0].metadata.message_type == "train"
        keep = messages[:1] if training else messages
        return super().send_and_receive(keep, timeout=timeout)


def test_too_few_replies_skip_the_round_loudly(data_path, tmp_path, caplog):
    cfg = _cfg(data_path, tmp_path, **{"num-server-rounds": 2})
    with caplog.at_level(logging.ERROR):
        run_federated(_SilentGrid(cfg, 3), cfg)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 2 and "1 of 1 sites" in skipped[0] and "min-train-nodes=2" in skipped[0]
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds["image_auroc"].nunique() == 1  # the global model was kept both rounds


def test_resume_restores_the_rounds_of_the_checkpoint_even_if_rounds_csv_lags(tmp_path):
    writer = ResultsWriter(tmp_path)
    for server_round in (1, 2):
        writer.record_round(server_round, {"image_auroc": 0.5 + server_round / 10},
                            {"w": torch.zeros(1)})
    # killed after the checkpoint of round 2 but before rounds.csv got its row
    pd.DataFrame(writer.rows[:1]).to_csv(tmp_path / "rounds.csv", index=False)
    resumed = ResultsWriter(tmp_path, resume=True)
    assert resumed.last_round == 1
    done, _, _ = resumed.load_latest()
    assert done == 2 and resumed.last_round == 2
    assert [r["image_auroc"] for r in resumed.rows] == pytest.approx([0.6, 0.7])
