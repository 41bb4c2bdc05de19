"""D-ADDA end to end: every stage on the in-process grid (a refused upload included), and one
real Flower simulation of the whole pipeline (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array

import clients.dadda
from fedad.config import ExperimentConfig
from fedad.dadda.payload import UPLOAD_ARRAYS
from fedad.dadda.protocol import UPLOAD
from fedad.dadda.workflow import run_dadda
from fedad.inprocess import InProcessGrid
from fedad.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "method": "dadda", "image-size": 32, "num-server-rounds": 2, "local-epochs": 1,
    "batch-size": 4, "max-train-batches": 2, "val-fraction": 0.0, "plot-every-round": False,
    "dadda-diffusion-size": 32, "dadda-unet-channels": 8, "dadda-unet-levels": 2,
    "dadda-diffusion-steps": 20, "dadda-train-iterations": 3, "dadda-finetune-iterations": 2,
    "dadda-sample-steps": 3, "dadda-dam-per-class": 2, "dadda-synth-per-class": 2,
    "dadda-localizer-channels": 8, "dam-quality-tries": 2,
}


def _config(tmp_path: Path, **overrides) -> ExperimentConfig:
    return ExperimentConfig.from_run_config({
        **TINY, "results-dir": str(tmp_path / "run"), "dadda-cache-dir": str(tmp_path / "cache"),
        **overrides})


def test_all_stages_in_process_refuse_a_tampered_upload(tmp_path, monkeypatch) -> None:
    honest = clients.dadda.DADDASite.query_dadda_upload

    def tampered(self, content):
        reply = honest(self, content)
        if self.partition_id == 0:  # a site that labels one uploaded image defective
            labels = reply[UPLOAD_ARRAYS]["image-labels"].numpy().copy()
            labels[0] = 1
            reply[UPLOAD_ARRAYS]["image-labels"] = Array(labels)
        return reply

    monkeypatch.setattr(clients.dadda.DADDASite, "query_dadda_upload", tampered)
    cfg = _config(tmp_path, partitioner="label-wise")
    summary = run_dadda(InProcessGrid(cfg, 3), cfg)
    root = tmp_path / "run"

    audit = [json.loads(line) for line in (root / "payloads.jsonl").read_text().splitlines()]
    uploads = [row for row in audit if row["kind"] == UPLOAD.message]
    assert [row["accepted"] for row in uploads] == [False, True, True]
    assert "defective-label" in uploads[0]["reason"]
    assert summary["uploads_accepted"] == 2
    # stage 2 trained on the accepted uploads only
    assert summary["generators"]["normal_images"] == sum(
        r["details"]["normal_images"] for r in uploads[1:])
    assert summary["generators"]["masks"] == sum(r["details"]["masks"] for r in uploads[1:])
    assert json.loads((root / "summary.json").read_text())["uploads_accepted"] == 2

    rounds = pd.read_csv(root / "rounds.csv")
    assert list(rounds["round"]) == [1, 2]
    assert rounds["class_accuracy"].between(0, 1).all()
    final = json.loads((root / "summary.json").read_text())["final"]
    assert final["class_accuracy"] == pytest.approx(rounds["class_accuracy"].iloc[-1])
    assert final["class_accuracy_u_pro"] == pytest.approx(rounds["class_accuracy"].max())
    # the default windows classifier is also scored where the ground truth puts the defect
    assert rounds["class_accuracy_at_true_defect"].between(0, 1).all()
    assert final["class_accuracy_at_true_defect"] == pytest.approx(
        rounds["class_accuracy_at_true_defect"].iloc[-1])
    table_ii = pd.read_csv(root / "table_ii.csv")
    assert table_ii["Synthesis"].tolist() == ["dadda"]
    assert table_ii["Detection AUC"].iloc[0] == pytest.approx(100 * rounds["image_auroc"].iloc[-1])
    table_iii = pd.read_csv(root / "table_iii.csv")
    assert table_iii[["Num. clients", "IID"]].values.tolist() == [[3, "✗"]]
    assert (root / "table_ii.md").is_file() and (root / "table_iii.md").is_file()
    synthesis = pd.read_csv(root / "synthesis.csv")
    assert (synthesis["num-synthetic"] > 0).all()
    assert sorted(p.name for p in root.glob("synthesized_partition*.png")) == [
        f"synthesized_partition{i}.png" for i in range(3)]
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 6  # per site: DAM pairs and the diffusion pairs
    assert set(pd.read_csv(root / "stages.csv")["stage"]) == {
        "stage1_dam_upload", "stage2_generators", "stage3_synthesis", "stage4_federated"}


def test_dam_only_skips_the_generators(tmp_path) -> None:
    cfg = _config(tmp_path, partitioner="iid", **{"dadda-synthesis": "dam-only",
                                                  "num-server-rounds": 1})
    summary = run_dadda(InProcessGrid(cfg, 2), cfg)
    assert "stage2_generators" not in summary["stage_seconds"]
    audit = (tmp_path / "run" / "payloads.jsonl").read_text().splitlines()
    dam = [row for row in map(json.loads, audit) if row["kind"] == UPLOAD.message]
    assert len(dam) == 2 and all(row["digest"] is None for row in dam), "DAM-only sends nothing"
    synthesis = pd.read_csv(tmp_path / "run" / "synthesis.csv")
    assert (synthesis["num-synthetic"] == synthesis["num-dam"]).all()
    assert pd.read_csv(tmp_path / "run" / "table_ii.csv")["Synthesis"].tolist() == ["dam-only"]


def test_runs_that_differ_only_in_the_detector_reuse_the_synthetic_pairs(tmp_path) -> None:
    def stages(name: str, **overrides) -> set[str]:
        cfg = _config(tmp_path, partitioner="iid", **{
            "dadda-synthesis": "dam-only", "num-server-rounds": 1,
            "results-dir": str(tmp_path / name), **overrides})
        run_dadda(InProcessGrid(cfg, 2), cfg)
        return set(pd.read_csv(tmp_path / name / "stages.csv")["stage"])

    assert stages("first") == {"stage1_dam", "stage3_synthesis", "stage4_federated"}
    # B, E and rounds are the federated stage's: stages 1-3 are not run again
    assert stages("other-b-e", **{"batch-size": 2, "local-epochs": 2, "num-server-rounds": 2}) \
        == {"stages1_3_reused", "stage4_federated"}
    # a synthesis setting changes the pairs; dadda-reuse-cache=false forces a new synthesis
    assert "stage1_dam" in stages("other-dam", **{"dam-quality-tries": 1})
    assert "stage1_dam" in stages("forced", **{"dadda-reuse-cache": False})


def test_training_without_synthesis_names_the_missing_cache(tmp_path) -> None:
    from fedad.dadda.detector import DADDA_RECIPE
    from fedad.experiment import prepare_data

    cfg = _config(tmp_path)
    samples = prepare_data(cfg, 2).samples(0, "train")
    with pytest.raises(FileNotFoundError, match="no synthetic pairs cached"):
        DADDA_RECIPE.fit(DADDA_RECIPE.build(cfg), samples, cfg, seed=0, server_round=1)


@pytest.mark.slow
def test_flower_simulation_runs_every_stage(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread per simulated site
    run_config = {**TINY, "results-dir": str(tmp_path / "run"),
                  "dadda-cache-dir": str(tmp_path / "cache"), "partitioner": "label-wise",
                  "num-server-rounds": 1}
    run = run_simulation(ROOT, num_supernodes=2, run_config=run_config,
                         flwr_home=tmp_path / "flwr", timeout=600)
    assert run.completed, run.log[-3000:]
    root = tmp_path / "run"
    for name in ("table_ii.csv", "table_ii.md", "table_iii.csv", "payloads.jsonl",
                 "rounds.csv", "summary.json", "synthesized_partition0.png"):
        assert (root / name).is_file(), name
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "dadda" and np.isfinite(summary["final"]["class_accuracy"])
