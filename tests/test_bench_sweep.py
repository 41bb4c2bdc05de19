"""`fedad bench`: a 2-cell sweep of real Flower simulations (a federated cell and the
centralized reference) that is interrupted after its first cell and resumed, and the same
2-cell sweep with ``runner: in-process``."""

import json

import pandas as pd
import pytest
import yaml

from fedad.bench import load_spec, run_sweep
from fedad.bench.report import sweep_report
from fedad.bench.spec import app_config_keys, parse_spec
from fedad.bench.sweep import is_finished
from fedad.bench.tables import collect_runs
from fedad.cli import main
from fedad.data import generate_dataset
from fedad.simulation import stop_local_superlink


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished 2-cell sweep: (folder, outcomes of the interrupted run, of the rerun)."""
    root = tmp_path_factory.mktemp("sweep")
    data = generate_dataset(root / "mvtec", categories=["washer"], image_size=32, num_train=8,
                            num_test_good=3, num_test_per_defect=2)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(sort_keys=False, data={
        "name": "tiny",
        "fixed": {"data-path": str(data), "category": "washer", "image-size": 32,
                  "backbone": "none", "num-server-rounds": 1, "local-epochs": 1,
                  "max-train-batches": 1, "batch-size": 4, "plot-every-round": False},
        "grid": {"strategy": ["fedavg"], "num-clients": [2], "seed": [0]},
        "centralized": True,
        "table": {"rows": ["strategy"], "metrics": ["image_auroc", "pixel_auroc"]},
        "cell-timeout": 300,
    }))
    spec = load_spec(config)
    out = root / "out"
    interrupted = run_sweep(spec, out, max_cells=1, progress=False)
    rerun = run_sweep(spec, out, progress=False)
    yield out, interrupted, rerun
    assert stop_local_superlink(out / ".flwr-home") == [], "SuperLink left running"


@pytest.mark.slow
def test_rerun_after_an_interruption_runs_only_the_missing_cell(sweep):
    out, interrupted, rerun = sweep
    assert [(o.cell.kind, o.status) for o in interrupted] == [("centralized", "done")]
    assert [(o.cell.kind, o.status) for o in rerun] == [("centralized", "skipped"),
                                                         ("federated", "done")]
    first = out / "cells" / interrupted[0].cell.name
    assert json.loads((first / "summary.json").read_text())["num_clients"] == 1
    second = out / "cells" / rerun[1].cell.name
    summary = json.loads((second / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["strategy"] == "fedavg"


@pytest.mark.slow
def test_sweep_tables_hold_both_cells_with_the_reference_first(sweep):
    out, _, _ = sweep
    written = sweep_report(out)
    assert {p.name for p in written} >= {"runs.csv", "table.csv", "table.md", "table.tex",
                                          "image_auroc_per_round.png", "roc.png"}
    runs = pd.read_csv(out / "runs.csv")
    assert runs["status"].tolist() == ["done", "done"]
    table = pd.read_csv(out / "table.csv")
    assert table["strategy"].tolist() == ["centralized", "fedavg"]
    finals = [json.loads((out / "cells" / c / "summary.json").read_text())["final"]
              for c in runs["cell"]]
    assert table["image_auroc_mean"].tolist() == pytest.approx(
        [f["image_auroc"] for f in finals])
    markdown = (out / "table.md").read_text()
    assert "| centralized" in markdown and "| fedavg" in markdown
    tex = (out / "table.tex").read_text()
    assert "\\begin{tabular}" in tex and "image\\_auroc" in tex and "\\textbf{" in tex


@pytest.mark.slow
def test_report_cli_rebuilds_the_sweep_tables(sweep, capsys):
    out, _, _ = sweep
    (out / "table.md").unlink(missing_ok=True)  # written by the sweep tables test, if run
    assert main(["report", str(out)]) == 0
    assert (out / "table.md").is_file() and "| centralized" in capsys.readouterr().out


@pytest.mark.slow
def test_the_in_process_runner_writes_the_same_finished_cells(tmp_path):
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], image_size=32,
                            num_train=8, num_test_good=3, num_test_per_defect=2)
    spec = parse_spec({
        "runner": "in-process",
        "fixed": {"data-path": str(data), "category": "washer", "image-size": 32,
                  "backbone": "none", "num-server-rounds": 1, "local-epochs": 1,
                  "max-train-batches": 1, "batch-size": 4, "plot-every-round": False},
        "grid": {"strategy": ["fedavg"], "num-clients": [2], "seed": [0]},
        "centralized": True, "table": {"rows": ["strategy"], "metrics": ["image_auroc"]},
        "cell-timeout": 300,
    }, "tiny.yaml", app_config_keys())
    out = tmp_path / "out"
    outcomes = run_sweep(spec, out, progress=False)
    assert [(o.cell.kind, o.status) for o in outcomes] == [("centralized", "done"),
                                                            ("federated", "done")]
    for outcome, clients in zip(outcomes, (1, 2), strict=True):
        folder = out / "cells" / outcome.cell.name
        assert is_finished(folder) and (folder / "cell.json").is_file()
        assert (folder / "rounds.csv").is_file() and (folder / "flwr.log").is_file()
        assert json.loads((folder / "summary.json").read_text())["num_clients"] == clients
    assert not (out / ".flwr-home").exists()  # no SuperLink, no Flower home
    assert [o.status for o in run_sweep(spec, out, progress=False)] == ["skipped"] * 2
    assert collect_runs(out, spec.cells())["status"].tolist() == ["done", "done"]
