"""Peer cells of `fedad bench`: anomalib's PatchCore and PaDiM on the images and Lite0 weights
of a fedad PaDiM cell (an in-process sweep on tiny synthetic data), their cost columns beside
fedad's, ``fedad bench --set``, and the one-line failures (bad name, anomalib missing)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import yaml

from fedad.bench import SweepError, load_spec, run_sweep
from fedad.bench.peer import paths_digest, tensor_digest
from fedad.bench.report import sweep_report
from fedad.bench.spec import app_config_keys, parse_spec
from fedad.cli import main
from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.experiment import prepare_data
from fedad.models.backbones import packaged_state_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEYS = app_config_keys()
DETECTION_METRICS = ("image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "image_f1_max",
                     "pixel_f1_max", "aupro")
COSTS = ["seconds", "fit_seconds", "test_seconds", "peak_memory_mb"]


def _tiny(data_path: str = "/data") -> dict:
    """A sweep of one fedad PaDiM cell (2 sites, 64 px, light settings) and two peers."""
    return {
        "name": "peers", "runner": "in-process",
        "fixed": {"data-path": data_path, "category": "washer", "image-size": 64,
                  "num-server-rounds": 1, "feature-scales": "1", "gaussian-grid": 4,
                  "gaussian-channels": 16, "feature-whitening": False, "map-baseline": False,
                  "plot-every-round": False},
        "grid": {"method": ["padim"], "num-clients": [2]},
        "peers": {"patchcore": {"backbone": "lite0"}, "padim": {"backbone": "lite0"}},
        "table": {"rows": ["method"], "metrics": ["image_auroc", "pixel_auroc", "aupro", *COSTS]},
        "cell-timeout": 300,
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The finished sweep folder and its outcomes."""
    root = tmp_path_factory.mktemp("peers")
    data = generate_dataset(root / "mvtec", categories=["washer"], image_size=64, num_train=10,
                            num_test_good=3, num_test_per_defect=2)
    spec = parse_spec(_tiny(str(data)), "peers.yaml", KEYS)
    out = root / "out"
    outcomes = run_sweep(spec, out, progress=False)
    sweep_report(out)  # from the sweep.yaml saved in out, peers included
    return out, outcomes


def _summary(out, name):
    return json.loads((out / "cells" / name / "summary.json").read_text())


@pytest.mark.slow
def test_both_peers_finish_with_fedads_metric_keys_and_their_costs(sweep):
    out, outcomes = sweep
    assert [(o.cell.kind, o.cell.name, o.status) for o in outcomes] == [
        ("peer", "peer-patchcore__num-clients-2", "done"),
        ("peer", "peer-padim__num-clients-2", "done"),
        ("federated", "method-padim__num-clients-2", "done")]
    fedad = _summary(out, "method-padim__num-clients-2")["final"]
    for name in ("peer-patchcore__num-clients-2", "peer-padim__num-clients-2"):
        final = _summary(out, name)["final"]
        assert set(DETECTION_METRICS) <= set(final) and set(DETECTION_METRICS) <= set(fedad)
        assert all(0 <= final[m] <= 1 and math.isfinite(final[m]) for m in DETECTION_METRICS)
        assert final["fit_seconds"] > 0 and final["test_seconds"] > 0
        assert final["peak_memory_mb"] > 100  # a process with torch and anomalib loaded
        with np.load(out / "cells" / name / "scores.npz") as scores:
            assert scores["labels"].shape == scores["image_scores"].shape == (8,)


@pytest.mark.slow
def test_peers_fit_and_test_on_the_images_of_fedads_cell(sweep):
    out, _ = sweep
    record = json.loads((out / "cells" / "method-padim__num-clients-2" / "cell.json").read_text())
    data = prepare_data(ExperimentConfig.from_run_config(record["run_config"]),
                        record["num_clients"])
    site_train = [s for site in range(2) for s in data.samples(site, "train")]
    normal = [s for s in site_train if s.label == 0]
    test = data.samples(-1, "test")
    assert len(normal) < len(site_train)  # real defects in the sites' train role: left out
    assert len(normal) < 10  # the sites' val images too
    for name in ("peer-patchcore__num-clients-2", "peer-padim__num-clients-2"):
        summary = _summary(out, name)
        assert summary["num_clients"] == 2
        assert (summary["train_images"], summary["test_images"]) == (len(normal), len(test))
        assert summary["train_digest"] == paths_digest(normal)
        assert summary["test_digest"] == paths_digest(test)


@pytest.mark.slow
def test_peers_run_on_fedads_packaged_lite0_weights_at_lite0s_strides(sweep):
    out, _ = sweep
    packaged = packaged_state_dict("lite0")
    random_init = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    layers = {"patchcore": ["blocks.2", "blocks.4"],  # strides 8, 16 (layer2, layer3)
              "padim": ["blocks.1", "blocks.2", "blocks.4"]}  # strides 4, 8, 16
    for peer, expected in layers.items():
        backbone = _summary(out, f"peer-{peer}__num-clients-2")["backbone"]
        assert (backbone["packaged"], backbone["timm"]) == ("lite0", "efficientnet_lite0")
        assert backbone["layers"] == expected and backbone["extractors_loaded"] == 1
        tensor = backbone["weights"]["tensor"]
        assert backbone["weights"]["sha256"] == tensor_digest(packaged[tensor])
        assert backbone["weights"]["sha256"] != tensor_digest(random_init[tensor])
    padim = _summary(out, "peer-padim__num-clients-2")["backbone"]
    assert padim["n_features"] == 16  # the cell's gaussian-channels


@pytest.mark.slow
def test_the_report_shows_fedad_and_peer_rows_with_seconds_and_peak_memory(sweep):
    out, _ = sweep
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert list(table.index) == ["anomalib-patchcore", "anomalib-padim", "padim"]
    assert table["kind"].tolist() == ["peer", "peer", "federated"]
    for metric in ("seconds", "peak_memory_mb"):
        assert (table[f"{metric}_mean"] > 0).all()
    assert math.isnan(table.loc["padim", "fit_seconds_mean"])
    cost = json.loads((out / "cells" / "method-padim__num-clients-2" / "cost.json").read_text())
    assert table.loc["padim", "peak_memory_mb_mean"] == cost["peak_memory_mb"] > 100
    lines = (out / "table.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "image_auroc", "pixel_auroc", "aupro", *COSTS]
    fedad_row = next(line for line in lines if line.startswith("| padim "))
    cells = [c.strip() for c in fedad_row.strip("|").split("|")]
    assert cells[COSTS.index("fit_seconds") + 4] == "–" and cells[4] != "–"
    assert "| anomalib-patchcore" in "\n".join(lines)
    assert (out / "plots" / "roc.png").is_file()


def test_peer_cells_pair_with_the_federated_cells_data_and_split():
    spec = parse_spec({
        "fixed": {"image-size": 64, "strategy": "fedavg"},
        "grid": {"method": ["padim", "memorybank"], "category": ["washer", "gear"],
                 "partitioner": ["iid", "label-wise"], "proximal-mu": [0.01, 0.1],
                 "feature-source": ["lite0", "lite2"], "num-prototypes": [8, 16],
                 "num-clients": [2, 3]},
        "exclude": [{"partitioner": "label-wise", "num-clients": 3}],
        "peers": ["patchcore", "padim"],
    }, "test.yaml", KEYS)
    cells = spec.cells()
    peers = [c for c in cells if c.kind == "peer"]
    assert cells[:len(peers)] == peers  # references first
    assert len(peers) == 2 * 2 * 3  # peers x categories x (iid 2, iid 3, label-wise 2)
    assert len({c.name for c in cells}) == len(cells)
    first = peers[0]
    assert first.name == "peer-patchcore__category-washer__partitioner-iid__num-clients-2"
    assert first.params == {"method": "anomalib-patchcore", "category": "washer",
                            "partitioner": "iid", "proximal-mu": "–", "feature-source": "–",
                            "num-prototypes": "–", "num-clients": 2}  # fedad's settings: no peers
    assert first.run_config == {"image-size": 64, "strategy": "fedavg", "category": "washer",
                                "partitioner": "iid"}
    assert first.num_clients == 2 and first.peer == {"model": "patchcore", "options": {}}
    assert not any(c.params["partitioner"] == "label-wise" and c.num_clients == 3
                   for c in peers)
    assert parse_spec(spec.to_dict(), "test.yaml", KEYS) == spec


@pytest.mark.parametrize(("peers", "grid", "message"), [
    (["patchkore"], {"method": ["padim"]}, "patchkore: not an anomalib image model"),
    ({"padim": 3}, {"method": ["padim"]}, "peers.padim: expected a mapping"),
    (["padim"], {}, "peers: needs method in grid"),
])
def test_bad_peers_are_refused_naming_the_file(peers, grid, message):
    with pytest.raises(SweepError, match=message) as err:
        parse_spec({"fixed": {"num-clients": 2}, "grid": grid, "peers": peers}, "bad.yaml",
                   KEYS)
    assert str(err.value).startswith("bad.yaml: ")
    if "patchkore" in message:
        assert "patchcore" in str(err.value) and "efficient_ad" in str(err.value)


def test_the_real_dev_sweep_pairs_fedads_heads_with_both_peers_per_category():
    spec = load_spec(PROJECT_ROOT / "configs" / "real_dev.yaml",
                     overrides=["data-path=~/fedad-real"])
    cells = spec.cells()
    categories = ("mpdd_metal_plate_512", "kolektorsdd")
    peers = [(c.params["category"], c.params["method"]) for c in cells if c.kind == "peer"]
    assert peers == [(category, f"anomalib-{peer}") for category in categories
                     for peer in ("patchcore", "padim")]
    fedad = {(c.params["category"], c.params["method"], c.params["feature-source"])
             for c in cells if c.kind == "federated"}
    assert fedad == {(category, *head) for category in categories
                     for head in (("memorybank", "lite0"), ("padim", "lite0"))} | {
        ("mpdd_metal_plate_512", "memorybank", "dinov2-vits14")}
    for cell in cells:
        cfg = ExperimentConfig.from_run_config({**cell.run_config, "results-dir": "/tmp/x"})
        assert (cfg.data_path, cfg.image_size, cfg.partitioner) == ("~/fedad-real", 224, "iid")
        assert cell.num_clients == 3 and not cfg.use_real_defects
    assert all("feature-source" not in c.run_config for c in cells if c.kind == "peer")
    assert spec.runner == "in-process" and spec.table.rows == ("method", "feature-source")


def test_set_overrides_a_fixed_and_a_swept_key(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_tiny()))
    spec = load_spec(config, overrides=["data-path=~/fedad-real", "method=memorybank",
                                        "image-size=96"])
    assert spec.fixed["data-path"] == "~/fedad-real" and spec.fixed["image-size"] == 96
    assert spec.grid["method"] == ("memorybank",)
    federated = [c for c in spec.cells() if c.kind == "federated"]
    assert [c.run_config["method"] for c in federated] == ["memorybank"]
    assert all(c.run_config["image-size"] == 96 for c in spec.cells())
    assert load_spec(config).fixed["image-size"] == 64
    for bad, message in (("no-such-key=1", "--set no-such-key: not a run-config key"),
                         ("image-size", "--set 'image-size': expected KEY=VALUE")):
        with pytest.raises(SweepError, match=message):
            load_spec(config, overrides=[bad])
    assert main(["bench", str(config), "--set", "no-such-key=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --set no-such-key: not a run-config key of the App (see "
                   "[tool.flwr.app.config] in pyproject.toml)")


@pytest.mark.slow
def test_a_peer_cell_without_anomalib_fails_with_the_install_line(tmp_path, monkeypatch):
    fake = tmp_path / "no-anomalib" / "anomalib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named anomalib')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))  # the peer process imports this one
    data = generate_dataset(tmp_path / "mvtec", categories=["washer"], image_size=32,
                            num_train=6, num_test_good=2, num_test_per_defect=1)
    spec = parse_spec(_tiny(str(data)), "peers.yaml", KEYS)
    [outcome] = run_sweep(spec, tmp_path / "out", max_cells=1, progress=False)
    assert (outcome.cell.kind, outcome.status) == ("peer", "failed")
    error = json.loads((tmp_path / "out" / "cells" / outcome.cell.name / "error.json")
                       .read_text())["error"]
    assert error.endswith("pip install 'fedad[peers]' (make install does)")
    assert "peer cells need anomalib" in error and "\n" not in error
