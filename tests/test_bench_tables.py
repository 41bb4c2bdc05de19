"""Sweep files, resumption, failure records, tables and plots, with a stand-in cell runner that
writes what a finished run writes (the real simulations are in test_bench_sweep.py)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedad.bench import SweepError, load_spec, run_sweep
from fedad.bench.report import sweep_report
from fedad.bench.spec import app_config_keys, parse_spec
from fedad.bench.sweep import (
    RUNNERS,
    first_client_error,
    in_process_cell,
    is_finished,
    simulate_cell,
)
from fedad.bench.tables import collect_runs, display_table, summarize, write_tables
from fedad.config import ExperimentConfig
from fedad.privacy import privacy_epsilon
from fedad.simulation import SimulationRun

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEYS = app_config_keys()


def _spec(**changes):
    data = {"fixed": {"image-size": 32, "local-epochs": 1},
            "grid": {"strategy": ["fedavg", "fedprox"], "partitioner": ["iid", "label-wise"],
                     "num-clients": [3], "seed": [0, 1]},
            "centralized": True, "table": {"metrics": ["image_auroc"]}}
    data.update(changes)
    return parse_spec(data, "test.yaml", KEYS)


def _accuracy(cell) -> float:
    """A made-up final metric that depends on the cell's settings."""
    config = cell.run_config
    return round(0.01 * config.get("local-epochs", 1) + 0.001 * config.get("seed", 0)
                 + (0.2 if config.get("partitioner") == "iid" else 0.0)
                 + (0.05 if config.get("dadda-classifier") == "lite0" else 0.0)
                 + 0.01 * cell.num_clients, 6)


class FakeRunner:
    """Writes rounds.csv, summary.json, scores.npz like a finished run; fails on request."""

    def __init__(self, fail: str = ""):
        self.fail = fail
        self.ran: list[str] = []

    def __call__(self, cell, folder, spec, flwr_home):
        self.ran.append(cell.name)
        if self.fail and self.fail in cell.name:
            return SimulationRun(7, "finished:failed", "x" * 5000 + "\nValueError: boom", 2.0)
        value = _accuracy(cell)
        pd.DataFrame({"round": [1, 2], "image_auroc": [value / 2, value],
                      "class_accuracy": [value / 2, value]}).to_csv(folder / "rounds.csv",
                                                                    index=False)
        (folder / "summary.json").write_text(json.dumps({"seconds": 1.5, "final": {
            "round": 2, "image_auroc": value, "class_accuracy": value,
            "class_accuracy_u_pro": value + 0.01, "class_accuracy_at_true_defect": value + 0.02}}))
        rng = np.random.default_rng(len(cell.name))
        labels = np.array([0, 0, 1, 1, 1])
        np.savez(folder / "scores.npz", labels=labels, image_scores=labels * value
                 + rng.uniform(0, 0.1, 5))
        return SimulationRun(7, "finished:completed", "log", 1.5)


def test_cells_expand_the_grid_and_add_a_centralized_reference_per_seed():
    cells = _spec().cells()
    reference = [c for c in cells if c.kind == "centralized"]
    federated = [c for c in cells if c.kind == "federated"]
    assert len(federated) == 8 and len(reference) == 2 and cells[:2] == reference
    for cell in reference:
        assert cell.num_clients == 1 and cell.run_config["min-train-nodes"] == 1
        assert cell.run_config["strategy"] == "fedavg" and cell.run_config["partitioner"] == "iid"
        assert cell.params["strategy"] == "centralized" and cell.params["partitioner"] == "–"
    assert {c.run_config["seed"] for c in reference} == {0, 1}
    assert all(c.run_config["min-train-nodes"] == 3 and c.num_clients == 3 for c in federated)
    assert "num-clients" not in federated[0].run_config
    assert len({c.name for c in cells}) == len(cells)


def test_excluded_combinations_are_left_out():
    spec = _spec(grid={"partitioner": ["iid", "label-wise"], "num-clients": [4, 10]},
                 exclude=[{"partitioner": "label-wise", "num-clients": 10}], centralized=False)
    combos = [(c.run_config["partitioner"], c.num_clients) for c in spec.cells()]
    assert combos == [("iid", 4), ("iid", 10), ("label-wise", 4)]


def test_an_excluded_combination_has_no_centralized_reference_either():
    spec = _spec(fixed={"local-epochs": 1},
                 grid={"method": ["msvt", "memorybank"], "image-size": [128, 224],
                       "strategy": ["fedavg"], "num-clients": [3]},
                 exclude=[{"method": "msvt", "image-size": 224},
                          {"method": "memorybank", "image-size": 128},
                          {"strategy": "fedavg", "method": "msvt", "image-size": 64}])
    for kind in ("centralized", "federated"):
        combos = [(c.run_config["method"], c.run_config["image-size"]) for c in spec.cells()
                  if c.kind == kind]
        assert combos == [("msvt", 128), ("memorybank", 224)], kind


@pytest.mark.parametrize(("changes", "message"), [
    ({"fixed": {"no-such-key": 1}}, "fixed.no-such-key: not a run-config key"),
    ({"fixed": {"results-dir": "/tmp/x"}}, "fixed.results-dir: set by the sweep"),
    ({"grid": {"strategy": []}}, "grid.strategy: expected a non-empty list"),
    ({"grid": {"strategy": ["fedavg"]}}, "num-clients: expected positive integers"),
    ({"table": {"rows": ["lr"]}}, "table: 'lr' is not a swept key"),
    ({"exclude": [{"lr": 1}]}, r"exclude\[0\]"),
    ({"colour": 1}, "unknown key"),
])
def test_bad_sweep_files_name_the_file_and_the_key(changes, message):
    with pytest.raises(SweepError, match=message) as err:
        _spec(**changes)
    assert "test.yaml" in str(err.value)


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on_then_is_retried(tmp_path):
    spec = _spec()
    runner = FakeRunner(fail="strategy-fedprox__partitioner-iid__num-clients-3__seed-0")
    outcomes = run_sweep(spec, tmp_path, runner=runner, progress=False)
    assert [o.status for o in outcomes].count("failed") == 1 and len(outcomes) == 10
    failed = next(o for o in outcomes if o.status == "failed")
    error = json.loads((tmp_path / "cells" / failed.cell.name / "error.json").read_text())
    assert error["status"] == "finished:failed" and "finished:failed" in error["error"]
    assert error["log_tail"].endswith("ValueError: boom") and len(error["log_tail"]) == 4000
    runs = collect_runs(tmp_path)
    assert (runs["status"] == "failed").sum() == 1 and (runs["status"] == "done").sum() == 9
    more = _spec(grid={**spec.to_dict()["grid"], "seed": [0, 1, 2]})  # grown grid
    assert collect_runs(tmp_path, more.cells())["status"].value_counts().to_dict() == {
        "done": 9, "failed": 1, "pending": 5}

    retry = FakeRunner()
    again = run_sweep(spec, tmp_path, runner=retry, progress=False)
    assert retry.ran == [failed.cell.name]
    assert all(o.status in ("skipped", "done") for o in again)
    assert not (tmp_path / "cells" / failed.cell.name / "error.json").exists()


def test_a_completed_run_whose_clients_raised_counts_as_failed(tmp_path):
    log = ("INFO: [ROUND 1]\nERROR flwr: An exception was raised when processing a message by "
           "RayBackend\nray.exceptions.RaySystemError: System error: Cannot register query\n")

    def runner(cell, folder, spec, flwr_home):
        FakeRunner()(cell, folder, spec, flwr_home)
        return SimulationRun(3, "finished:completed", log, 1.0)

    spec = _spec(centralized=False, grid={"num-clients": [2]})
    [outcome] = run_sweep(spec, tmp_path, runner=runner, progress=False)
    assert outcome.status == "failed"
    assert "RaySystemError: System error: Cannot register query" in outcome.error
    assert collect_runs(tmp_path)["status"].tolist() == ["failed"]


def test_a_cell_killed_after_writing_its_summary_is_rerun(tmp_path):
    class Killed(BaseException):
        """What a killed sweep looks like from inside: the runner never returns."""

    def runner(cell, folder, spec, flwr_home):
        (folder / "summary.json").write_text(json.dumps({"final": {"round": 1}}))  # partial
        raise Killed

    spec = _spec(centralized=False, grid={"num-clients": [2]})
    with pytest.raises(Killed):
        run_sweep(spec, tmp_path, runner=runner, progress=False)
    assert collect_runs(tmp_path)["status"].tolist() == ["incomplete"]
    rerun = FakeRunner()
    [outcome] = run_sweep(spec, tmp_path, runner=rerun, progress=False)
    assert rerun.ran == [outcome.cell.name] and outcome.status == "done"
    assert collect_runs(tmp_path)["status"].tolist() == ["done"]


def test_a_cell_with_an_invalid_config_fails_without_a_simulation(tmp_path):
    spec = _spec(fixed={"method": "no-such-method"}, centralized=False,
                 grid={"num-clients": [2]})
    runner = FakeRunner()
    [outcome] = run_sweep(spec, tmp_path, runner=runner, progress=False)
    assert runner.ran == [] and outcome.status == "failed"
    assert "method='no-such-method'" in outcome.error


def test_a_finished_cell_with_another_config_is_not_reused(tmp_path):
    run_sweep(_spec(), tmp_path, runner=FakeRunner(), progress=False)
    with pytest.raises(SweepError, match="different run-config"):
        run_sweep(_spec(fixed={"image-size": 64, "local-epochs": 1}), tmp_path,
                  runner=FakeRunner(), progress=False)


def test_table_means_and_stds_over_seeds_mark_the_best_federated_row(tmp_path):
    spec = _spec()
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    summary = summarize(collect_runs(tmp_path), spec.table)
    assert summary["kind"].iloc[0] == "centralized" and len(summary) == 5
    assert (summary["seeds"] == 2).all()
    fedavg_iid = summary[(summary["strategy"] == "fedavg") & (summary["partitioner"] == "iid")]
    values = [_accuracy(c) for c in spec.cells()
              if c.run_config.get("strategy") == "fedavg" and c.kind == "federated"
              and c.run_config["partitioner"] == "iid"]
    assert fedavg_iid["image_auroc_mean"].item() == pytest.approx(np.mean(values))
    assert fedavg_iid["image_auroc_std"].item() == pytest.approx(np.std(values, ddof=1))
    shown = display_table(summary, spec.table, "md")
    bold = shown["image_auroc"].str.startswith("**")
    assert bold.tolist() == [False, True, False, True, False]  # the two iid rows tie
    assert " ± " in shown["image_auroc"].iloc[0]


def test_dadda_table3_preset_has_the_layout_of_the_paper(tmp_path):
    spec = load_spec(PROJECT_ROOT / "configs" / "dadda_table3.yaml")
    spec = dataclasses.replace(spec, fixed={**spec.fixed, "method": "msvt"})
    outcomes = run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    assert len(outcomes) == 56 and all(o.status == "done" for o in outcomes)
    shown = display_table(summarize(collect_runs(tmp_path), spec.table), spec.table, "md")
    metrics = ("U-Pro", "F-Pro", "at the true defect")
    groups = [f"{g} / {m}" for g in ("No pre-training", "Pre-training") for m in metrics]
    assert list(shown.columns) == ["Num. clients", "B", "E", "IID", *groups]
    assert len(shown) == 28
    assert shown.iloc[0, :4].tolist() == ["1", "8", "10", "–"]
    assert shown["IID"].iloc[1:].value_counts().to_dict() == {"✓": 18, "✗": 9}
    assert set(shown["Num. clients"].iloc[1:]) == {"5", "10"}
    for column in groups:
        best = shown[shown[column].str.startswith("**")]
        assert best[["Num. clients", "E", "IID"]].values.tolist() == [["10", "10", "✓"]] * 3
    # the made-up metric adds 0.05 for the pre-trained classifier
    assert (shown["Pre-training / F-Pro"].str.strip("*").astype(float)
            - shown["No pre-training / F-Pro"].str.strip("*").astype(float)).round(3).eq(0.05).all()


def test_sweep_report_writes_tables_and_plots(tmp_path):
    spec = _spec()
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    names = {p.name for p in sweep_report(tmp_path, spec)}
    assert {"table.md", "table.tex", "table.csv", "runs.csv", "image_auroc_per_round.png",
            "roc.png"} <= names
    assert "aggregation_weights.png" not in names  # no cell wrote aggregation_weights.csv
    cell = tmp_path / "cells" / spec.cells()[-2].name  # seed 0, as plotted
    pd.DataFrame({"round": [1, 1], "node": [5, 6], "partition": [0, 1], "weight": [0.4, 0.6],
                  "q": [0.9, 0.8], "s": [1.0, 2.0]}).to_csv(cell / "aggregation_weights.csv",
                                                             index=False)
    assert "aggregation_weights.png" in {p.name for p in sweep_report(tmp_path)}  # sweep.yaml


@pytest.mark.parametrize("marker", ["running", "error.json"])
def test_a_cell_with_a_summary_and_a_running_marker_or_an_error_is_rerun(tmp_path, marker):
    spec = _spec(centralized=False, grid={"num-clients": [2]})
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    [cell] = spec.cells()
    folder = tmp_path / "cells" / cell.name
    (folder / marker).write_text(json.dumps({"status": "killed", "error": "killed"}))
    assert (folder / "summary.json").is_file() and not is_finished(folder)
    assert collect_runs(tmp_path)["status"].tolist() == [
        "incomplete" if marker == "running" else "failed"]
    rerun = FakeRunner()
    [outcome] = run_sweep(spec, tmp_path, runner=rerun, progress=False)
    assert rerun.ran == [cell.name] and outcome.status == "done" and is_finished(folder)
    assert not (folder / marker).exists()


def test_the_runner_key_picks_how_cells_run():
    assert _spec().runner == "flwr" and RUNNERS["flwr"] is simulate_cell
    spec = _spec(runner="in-process")
    assert spec.runner == "in-process" and RUNNERS["in-process"] is in_process_cell
    assert parse_spec(spec.to_dict(), "again.yaml", KEYS) == dataclasses.replace(
        spec, source="again.yaml")
    with pytest.raises(SweepError, match="runner='ray'"):
        _spec(runner="ray")


@pytest.mark.parametrize(("name", "runner", "cells", "centralized"), [
    ("byzantine", "in-process", 18, 0),       # (FedAvg clean + 5 attacked) x 3 seeds
    ("dp", "in-process", 21, 0),              # (no DP + 4 at C=1 + 2 at C=10) x 3 seeds
    ("fed_msvt", "in-process", 48, 3),        # (5 strategies x 3 partitioners + 1) x 3 seeds
    ("mae", "in-process", 18, 12),            # 6 categories x (DyT, LayerNorm central + DyT fed)
    ("msvt_categories", "flwr", 6, 0),
    ("detectors_real", "in-process", 12, 6),  # 2 sets x 3 methods, federated + centralized
    ("aca_quality", "in-process", 9, 0),      # (FedAvg + ACA+CFA x 2 q_i) x 3 seeds
    ("dadda_table2", "in-process", 16, 0),    # 4 categories x 2 syntheses x 2 seeds
])
def test_the_sweep_files_of_the_former_bench_scripts_expand_to_valid_cells(
        name, runner, cells, centralized):
    spec = load_spec(PROJECT_ROOT / "configs" / f"{name}.yaml")
    expanded = spec.cells()
    assert spec.runner == runner and len(expanded) == cells
    assert sum(c.kind == "centralized" for c in expanded) == centralized
    for cell in expanded:
        assert set(cell.run_config) <= KEYS, set(cell.run_config) - KEYS
        cfg = ExperimentConfig.from_run_config({**cell.run_config, "results-dir": "/tmp/x"})
        assert cfg.min_train_nodes == cell.num_clients


def _checkpoints(folder: Path, *values: float) -> None:
    """Checkpoints of a 2-parameter global model, one per round, with the given first value."""
    (folder / "checkpoints").mkdir()
    for i, value in enumerate(values, 1):
        torch.save({"state_dict": {"w": torch.tensor([value, 0.0]), "steps": torch.tensor(3)}},
                   folder / "checkpoints" / f"round-{i:03d}.pt")


def test_byzantine_report_measures_the_model_distance_to_the_clean_run(tmp_path):
    spec = load_spec(PROJECT_ROOT / "configs" / "byzantine.yaml")
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    for cell in spec.cells():  # the clean run steps 2 -> 3; the attacked ones end elsewhere
        attacked = cell.run_config["attack"] != "none"
        _checkpoints(tmp_path / "cells" / cell.name, 2.0, 3.0 + 2 * attacked
                     + 4 * (cell.run_config["strategy"] == "fedavg" and attacked))
    runs = collect_runs(tmp_path, spec.cells(), spec.table)
    distance = runs.set_index(["strategy", "attack"])["model_distance"]
    assert (distance.loc[("fedavg", "none")] == 0).all()
    assert (distance.loc[("fedavg", "sign-flip")] == 6).all()
    assert (distance.loc[("krum", "sign-flip")] == 2).all()
    shown = display_table(summarize(runs, spec.table), spec.table, "md")
    assert list(shown.columns) == ["strategy", "attack", "image_auroc", "seconds",
                                   "model_distance"]  # the fake runs have no pixel metrics
    bold = shown[shown["model_distance"].str.startswith("**")]
    assert len(bold) == 1 and bold["attack"].item() == "none"  # lower is better


def test_dp_report_has_an_epsilon_row_key(tmp_path):
    spec = load_spec(PROJECT_ROOT / "configs" / "dp.yaml")
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    for cell in spec.cells():
        _checkpoints(tmp_path / "cells" / cell.name, 1.0, 2.0)
    summary = summarize(collect_runs(tmp_path, spec.cells(), spec.table), spec.table)
    shown = display_table(summary, spec.table, "md")
    assert list(shown.columns)[:4] == ["dp", "C", "z", "epsilon"] and len(shown) == 7
    epsilon = dict(zip(shown["z"] + "@" + shown["C"], shown["epsilon"], strict=True))
    assert epsilon["0.0@1.0"] == epsilon["0.0@10.0"] == "inf"
    expected = privacy_epsilon(1.0, 3, 1e-5)
    assert float(epsilon["1.0@1.0"]) == pytest.approx(expected, rel=1e-2)
    assert float(epsilon["0.1@1.0"]) > float(epsilon["0.3@1.0"]) > float(epsilon["1.0@1.0"])
    assert (summary["model_distance_mean"] == 0).all()  # every cell ends where the reference does


def test_dadda_table2_report_has_the_layout_of_the_paper(tmp_path):
    spec = load_spec(PROJECT_ROOT / "configs" / "dadda_table2.yaml")
    spec = dataclasses.replace(spec, fixed={**spec.fixed, "method": "msvt"})
    run_sweep(spec, tmp_path, runner=FakeRunner(), progress=False)
    for cell in spec.cells():  # D-ADDA ahead on detection AUC except for washer seed 1
        summary_path = tmp_path / "cells" / cell.name / "summary.json"
        summary = json.loads(summary_path.read_text())
        dadda = cell.run_config["dadda-synthesis"] == "dadda"
        lose = cell.run_config["category"] == "washer" and cell.run_config["seed"] == 1
        summary["final"].update({m: 0.5 for m in spec.table.metrics})
        summary["final"].update(image_auroc=0.6 + 0.12 * (dadda != lose)
                                + 0.01 * cell.run_config["seed"], pixel_ap=0.05)
        summary_path.write_text(json.dumps(summary))
    runs = collect_runs(tmp_path, spec.cells(), spec.table)
    paths = write_tables(tmp_path, runs, spec.table, spec.name)
    shown = display_table(summarize(runs, spec.table), spec.table, "md")
    assert list(shown.columns) == ["category", "Synthesis", "Detection AUC", "Detection AP",
                                   "Detection F1-max", "Localization AUC", "Localization AP",
                                   "Localization F1-max"]
    assert shown["category"].tolist() == [c for c in ("brick", "wood", "hex_nut", "washer",
                                                      "mean of categories") for _ in (0, 1)]
    brick_dadda = shown.iloc[1]
    assert brick_dadda["Detection AUC"] == "**72.5 ± 0.7**"
    assert brick_dadda["Localization AP"] == "**5.0 ± 0.0**"  # all tie
    means = shown[shown["category"] == "mean of categories"].set_index("Synthesis")
    assert means.loc["dadda", "Detection AUC"] == "71.0"  # (3 x 72.5 + 66.5) / 4, no std
    compare = pd.read_csv(paths["compare"])
    assert compare.iloc[0, 0] == "dadda > dam-only"
    assert compare["Detection AUC"].item() == "7 / 8" and compare["Localization AP"].item() \
        == "0 / 8"
    assert "| dadda > dam-only |" in paths["md"].read_text()


def test_mae_and_categories_reports_add_mean_rows_and_the_category_kind(tmp_path):
    mae = load_spec(PROJECT_ROOT / "configs" / "mae.yaml")
    run_sweep(mae, tmp_path / "mae", runner=FakeRunner(), progress=False)
    shown = display_table(summarize(collect_runs(tmp_path / "mae"), mae.table), mae.table, "md")
    assert list(shown.columns)[:3] == ["category", "mae-norm", "num-clients"]
    assert shown.tail(3)[["category", "mae-norm", "num-clients"]].values.tolist() == [
        ["mean", "dyt", "1"], ["mean", "layernorm", "1"], ["mean", "dyt", "3"]]
    categories = load_spec(PROJECT_ROOT / "configs" / "msvt_categories.yaml")
    run_sweep(categories, tmp_path / "cat", runner=FakeRunner(), progress=False)
    runs = collect_runs(tmp_path / "cat", categories.cells(), categories.table)
    shown = display_table(summarize(runs, categories.table), categories.table, "md")
    assert list(shown.columns)[:2] == ["category", "kind"]
    assert dict(zip(shown["category"], shown["kind"], strict=True)) == {
        "brick": "texture", "fabric": "texture", "gear": "object", "hex_nut": "object",
        "washer": "object", "wood": "texture"}


@pytest.mark.parametrize(("table", "message"), [
    ({"derived": ["colour"]}, "table.derived: unknown colour"),
    ({"derived": ["model_distance"]}, "table.reference"),
    ({"metrics": ["model_distance"]}, "model_distance needs table.derived"),
    ({"mean-over": "seed"}, "table.mean-over"),
    ({"compare": {"strategy": ["fedavg", "krum"]}}, "table.compare"),
    ({"scale": 0}, "scale must be > 0"),
])
def test_bad_report_options_name_the_key(table, message):
    with pytest.raises(SweepError, match=message):
        _spec(table=table)


def test_a_site_error_of_the_in_process_grid_is_found_in_the_log():
    log = ("INFO fedad: round 1\nERROR fedad.inprocess: partition 1 failed: Traceback (most "
           "recent call last):\n  File \"x.py\", line 1, in f\nValueError: boom\nINFO done\n")
    assert first_client_error(log) == "ValueError: boom"
    assert first_client_error("INFO fedad: partition 1 failed to load, retrying\n") == ""
