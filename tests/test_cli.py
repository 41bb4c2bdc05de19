"""The `fedad` command line, run in-process."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedad.cli import main
from fedad.config import ExperimentConfig
from fedad.results import ResultsWriter
from fedad.train.predictions import Predictions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--categories", "wood", "--num-train", "6",
                 "--image-size", "64"]) == 0
    return out


def test_data_check_prints_counts(dataset, capsys):
    assert main(["data", "check", str(dataset)]) == 0
    assert "wood: train 6 (good 6)" in capsys.readouterr().out


def test_data_check_fails_with_the_file_named(dataset, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "wood" / "train" / "good").mkdir(parents=True)
    (broken / "wood" / "test" / "good").mkdir(parents=True)
    (broken / "wood" / "test" / "good" / "000.png").write_bytes(b"not a png")
    assert main(["data", "check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "wood" in err


def test_data_partitions_prints_a_table_per_client(dataset, capsys):
    assert main(["data", "partitions", "--data-path", str(dataset), "--category", "wood",
                 "--partitioner", "label-wise", "--num-partitions", "2", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "label-wise x 2" in out and "test" in out and "good" in out


def test_report_rebuilds_plots_from_a_results_folder(tmp_path, capsys):
    writer = ResultsWriter(tmp_path / "run")
    for r in (1, 2):
        writer.record_round(r, {"image_auroc": 0.5 + r / 10, "pixel_auroc": 0.7},
                            {"w": torch.zeros(2)})
    labels = np.array([0, 0, 1, 1])
    writer.write_scores(Predictions(labels, np.array([0, 0, 1, 2]), np.array([.1, .6, .9, .4]),
                                    np.zeros((4, 8, 8)), np.zeros((4, 8, 8)),
                                    np.zeros((4, 8, 8, 3))), ("good", "crack", "hole"))
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "image_auroc" in out and "per defect type" in out
    per_type = pd.read_csv(tmp_path / "run" / "defect_types.csv").set_index("defect_type")
    assert per_type.loc["crack", "image_auroc"] == 1.0 and per_type.loc["hole", "flagged"] == 0
    assert per_type.loc["good", "flagged"] == 0.5  # one of the two good images above 0.5
    for path in ("plots/metrics_per_round.png", "plots/roc.png"):
        assert (tmp_path / "run" / path).stat().st_size > 1000


def test_saved_scores_rank_the_uncalibrated_scores_where_the_calibration_ties(tmp_path):
    writer = ResultsWriter(tmp_path)
    labels = np.array([0, 0, 1, 1])
    writer.write_scores(Predictions(labels, np.array([0, 0, 1, 1]), np.ones(4),  # all tied at 1
                                    np.zeros((4, 8, 8)), np.zeros((4, 8, 8)),
                                    np.zeros((4, 8, 8, 3)), np.array([1., 2., 3., 1.5])),
                        ("good", "crack"))
    per_type = pd.read_csv(tmp_path / "defect_types.csv").set_index("defect_type")
    assert per_type.loc["crack", "image_auroc"] == 0.75  # 3 of 4 pairs, not the ties' 0.5
    with np.load(tmp_path / "scores.npz") as scores:
        assert list(scores["ranking_scores"]) == [1., 2., 3., 1.5]
    with pytest.raises(ValueError, match="ranking_scores: 3 rows"):
        Predictions(labels, labels, np.ones(4), np.zeros((4, 2, 2)), np.zeros((4, 2, 2)),
                    np.zeros((4, 2, 2, 3)), np.ones(3)).check()


def test_report_on_a_folder_without_rounds_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "rounds.csv: not found" in capsys.readouterr().err


def test_results_writer_resumes_history_and_latest_checkpoint(tmp_path):
    writer = ResultsWriter(tmp_path)
    writer.record_round(1, {"image_auroc": 0.6}, {"w": torch.ones(2)})
    writer.record_round(2, {"image_auroc": 0.7}, {"w": torch.full((2,), 2.0)})
    assert ResultsWriter(tmp_path).last_round == 0  # a new run in the same folder starts afresh
    again = ResultsWriter(tmp_path, resume=True)  # a restarted server
    assert again.last_round == 2
    round_, state, _ = again.load_latest()
    assert round_ == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    again.record_round(2, {"image_auroc": 0.8}, {"w": torch.zeros(2)})  # the round redone
    rows = pd.read_csv(tmp_path / "rounds.csv")
    assert rows["round"].tolist() == [1, 2] and rows["image_auroc"].iloc[-1] == 0.8
    summary = again.write_summary(ExperimentConfig(), 3, {})
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["image_auroc"] == 0.8
    assert summary["rounds"] == 2 and summary["num_clients"] == 3


def test_resume_run_config_repeats_the_saved_config(tmp_path):
    from fedad.cli import resume_run_config

    ExperimentConfig(strategy="aca", num_server_rounds=5).to_yaml(tmp_path / "config.yaml")
    text = resume_run_config(str(tmp_path))
    assert "strategy='aca'" in text and "num-server-rounds=5" in text
    assert f"resume-from='{tmp_path.resolve()}'" in text
    with pytest.raises(ValueError, match=r"config\.yaml not found"):
        resume_run_config(str(tmp_path / "missing"))
