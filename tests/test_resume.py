"""Every method resumes: a server killed with SIGKILL after round k (or, for D-ADDA, after its
server-side stage 2) is resumed from its results folder with ``resume-from`` and ends equal to
an uninterrupted run (in-process grid: the real server and site code). Every run is a fresh
server process, so the three runs of a test share one environment (thread count, caches)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.inprocess import run_in_process
from fedad.server_run import RESUME_KIND

SITES = 3
RUN_AND_WAIT = """
import sys
from fedad.config import ExperimentConfig
from fedad.inprocess import run_in_process
from fedad.server_run import RESUME_KIND
run_in_process(ExperimentConfig.from_yaml(sys.argv[1]), int(sys.argv[2]))
"""
COMPARED = ("image_auroc", "pixel_auroc", "aupro")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=18, num_test_good=3, num_test_per_defect=2)


def _cfg(data_path, results, **changes) -> ExperimentConfig:
    return ExperimentConfig.from_run_config({
        "data-path": str(data_path), "category": "washer", "image-size": 64, "backbone": "none",
        "local-epochs": 1, "max-train-batches": 1, "batch-size": 8, "num-server-rounds": 3,
        "results-dir": str(results), "plot-every-round": False, "val-fraction": 0.3,
        "min-train-nodes": 2, **changes})


def _start(cfg: ExperimentConfig, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / f"{Path(cfg.resolved_results_dir()).name}.yaml"
    cfg.to_yaml(path)
    return subprocess.Popen([sys.executable, "-c", RUN_AND_WAIT, str(path), str(SITES)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


def run_server(cfg: ExperimentConfig, tmp_path: Path, timeout: float = 600) -> dict:
    """Run ``cfg`` in a server process to its end; its summary.json."""
    proc = _start(cfg, tmp_path)
    assert proc.wait(timeout=timeout) == 0, "the server process failed"
    return json.loads((cfg.resolved_results_dir() / "summary.json").read_text())


def kill_after(cfg: ExperimentConfig, marker: Path, tmp_path: Path, timeout: float = 300) -> int:
    """Run ``cfg`` in a server process and SIGKILL it as soon as ``marker`` exists; the round
    of its last checkpoint, which a resume continues from (a fast round may finish before the
    kill lands)."""
    proc = _start(cfg, tmp_path)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no {marker.name} after {timeout} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    latest = marker.parent / "latest.pt"
    return int(torch.load(latest, weights_only=True)["round"]) if latest.exists() else 0


def _assert_same_end(resumed: dict, reference: dict, metrics=COMPARED) -> None:
    assert resumed["rounds"] == reference["rounds"]
    for metric in metrics:
        assert resumed["final"][metric] == pytest.approx(reference["final"][metric],
                                                         abs=1e-6), metric


def _assert_same_crossings(results: Path, reference: Path, resumed_after: int) -> None:
    """The killed + resumed run's audit log holds what the uninterrupted run's holds (a round
    the kill interrupted appears twice), and a resume row after the checkpointed round."""
    def crossings(folder):
        rows = pd.read_json(folder / "payloads.jsonl", lines=True)
        return rows[rows["kind"] != RESUME_KIND], rows[rows["kind"] == RESUME_KIND]

    rows, resumes = crossings(results)
    reference_rows, none = crossings(reference)
    columns = ["round", "node", "kind", "accepted", "digest"]
    assert none.empty and resumes["round"].tolist() == [resumed_after]
    assert (set(map(tuple, rows[columns].astype(str).values))
            == set(map(tuple, reference_rows[columns].astype(str).values)))


def test_a_killed_server_resumes_from_its_last_checkpoint(data_path, tmp_path):
    reference = run_server(_cfg(data_path, tmp_path / "reference", strategy="fedmsvt"), tmp_path)
    results = tmp_path / "killed"
    cfg = _cfg(data_path, results, strategy="fedmsvt")
    assert kill_after(cfg, results / "checkpoints" / "round-002.pt", tmp_path) == 2

    with pytest.raises(ConfigError, match="num-server-rounds: 3 -> 4"):
        run_in_process(cfg.replace(resume_from=str(results), num_server_rounds=4), SITES)
    resumed = run_server(cfg.replace(resume_from=str(results)), tmp_path)
    assert pd.read_csv(results / "rounds.csv")["round"].tolist() == [1, 2, 3]
    _assert_same_end(resumed, reference)
    weights = pd.read_csv(results / "aggregation_weights.csv")
    assert sorted(weights["round"].unique()) == [1, 2, 3]
    _assert_same_crossings(results, tmp_path / "reference", resumed_after=2)


MAE = {"method": "mae", "mae-patch-size": 8, "mae-embed-dim": 32, "mae-depth": 1, "mae-heads": 2,
       "mae-decoder-dim": 16, "mae-decoder-depth": 1, "mae-decoder-heads": 2,
       "mae-pretrain-rounds": 1}
HEADS = {"num-prototypes": 8, "gmm-components": 2, "gmm-covariance": "diag", "flow-blocks": 2,
         "flow-hidden": 32, "flow-epochs": 1, "max-patches": 2000, "backbone": "lite0"}


@pytest.mark.parametrize("settings", [MAE, {**HEADS, "method": "memorybank"},
                                      {**HEADS, "method": "gmm"}, {**HEADS, "method": "flow"}],
                         ids=lambda s: s["method"])  # padim runs one round: nothing to resume
def test_every_method_resumes_after_round_one_and_ends_as_an_uninterrupted_run(
        data_path, tmp_path, settings):
    reference = run_server(_cfg(data_path, tmp_path / "reference", **settings), tmp_path)
    results = tmp_path / "killed"
    cfg = _cfg(data_path, results, **settings)
    done = kill_after(cfg, results / "checkpoints" / "round-001.pt", tmp_path)
    assert done in (1, 2), "killed mid-run"
    resumed = run_server(cfg.replace(resume_from=str(results)), tmp_path)
    assert pd.read_csv(results / "rounds.csv")["round"].tolist() == [1, 2, 3]
    _assert_same_end(resumed, reference)
    _assert_same_crossings(results, tmp_path / "reference", resumed_after=done)


def test_resume_without_a_checkpoint_names_the_key(data_path, tmp_path):
    cfg = _cfg(data_path, tmp_path / "empty", **MAE)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    cfg.to_yaml(tmp_path / "empty" / "config.yaml")
    with pytest.raises(ConfigError, match=r"resume-from=.*no checkpoint"):
        run_in_process(cfg.replace(resume_from=str(tmp_path / "empty")), SITES)


DADDA = {
    "method": "dadda", "image-size": 32, "num-server-rounds": 2, "local-epochs": 1,
    "batch-size": 4, "max-train-batches": 2, "val-fraction": 0.0, "partitioner": "label-wise",
    "dadda-diffusion-size": 32, "dadda-unet-channels": 8, "dadda-unet-levels": 2,
    "dadda-diffusion-steps": 20, "dadda-train-iterations": 3, "dadda-finetune-iterations": 2,
    "dadda-sample-steps": 3, "dadda-dam-per-class": 2, "dadda-synth-per-class": 2,
    "dadda-localizer-channels": 8, "dam-quality-tries": 2,
}


@pytest.fixture(scope="module")
def dadda_reference(data_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("dadda-reference")
    return run_server(_cfg(data_path, root / "run", **DADDA,
                           **{"dadda-cache-dir": str(root / "cache")}), root)


@pytest.mark.parametrize("marker", ["stage-generators.pt", "round-001.pt"])
def test_dadda_resumes_without_training_the_generators_again(
        data_path, tmp_path, dadda_reference, marker):
    results = tmp_path / "killed"
    cfg = _cfg(data_path, results, **DADDA, **{"dadda-cache-dir": str(tmp_path / "cache")})
    kill_after(cfg, results / "checkpoints" / marker, tmp_path)
    assert not (results / "summary.json").exists(), "killed mid-run"

    resumed = run_server(cfg.replace(resume_from=str(results)), tmp_path)
    # stage 2 was restored, not run again: no upload crossed twice, no training time
    assert "stage2_generators" not in resumed["stage_seconds"]
    audit = pd.read_json(results / "payloads.jsonl", lines=True)
    assert (audit["kind"] == "query.dadda_upload").sum() == SITES  # uploaded once, not twice
    assert "stage-generators.pt" in audit.loc[audit["kind"] == RESUME_KIND, "details"].map(
        lambda d: d["checkpoint"]).tolist()
    assert resumed["uploads_accepted"] == dadda_reference["uploads_accepted"] > 0
    for stat in ("normal_images", "masks", "image_model_loss", "mask_model_loss"):
        assert resumed["generators"][stat] == dadda_reference["generators"][stat], stat
    _assert_same_end(resumed, dadda_reference, (*COMPARED, "class_accuracy"))
    assert pd.read_csv(results / "rounds.csv")["round"].tolist() == [1, 2]
