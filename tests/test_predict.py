"""`fedad predict`: a finished run's scorer reproduces the run's own test scores; inputs as
files, folders or an MVTec category; a corrupt image is reported and skipped; a folder without
a checkpoint, or of an unknown method, fails with one line naming it."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter
from tiny_runs import TINY_METHODS, TINY_RUN

from fedad.cli import main
from fedad.config import ExperimentConfig
from fedad.dadda.detector import defect_types_of
from fedad.data import generate_dataset
from fedad.heads.scoring import ScoreScale
from fedad.models.anomaly_map import smooth_maps
from fedad.predict import (
    SCORERS,
    InputError,
    RunError,
    collect_inputs,
    load_scorer,
    open_run,
    predict_images,
    run_thresholds,
)
from fedad.predict.run import test_split as run_test_split

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TINY_RUN
METHODS = TINY_METHODS
HEAD_METHODS = {"memorybank", "gmm", "flow", "padim"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=8, num_test_good=2, num_test_per_defect=1, image_size=32)


@pytest.fixture(scope="module")
def finished(dataset, runs_once):
    """method -> the results folder of a finished one-round run of it (run once)."""
    return runs_once(lambda method, folder: ExperimentConfig.from_run_config({
        **TINY, **METHODS[method], "data-path": str(dataset), "category": "washer",
        "results-dir": str(folder), "dadda-cache-dir": str(folder / "cache")}))


@pytest.mark.parametrize("method", list(METHODS))
def test_predict_reproduces_the_runs_own_test_scores(finished, tmp_path, method):
    run = open_run(finished(method))
    paths = [s.image_path for s in run_test_split(run)]
    result = predict_images(load_scorer(run), paths, tmp_path / "out", run_thresholds(run),
                            batch_size=3, progress=False)
    saved = np.load(run.root / "scores.npz")
    table = result.table
    assert table["path"].tolist() == [str(p) for p in paths] and not result.skipped
    np.testing.assert_allclose(table["score"], saved["image_scores"], rtol=0, atol=1e-5)
    if method in HEAD_METHODS:  # the uncalibrated scores the run's metrics rank
        np.testing.assert_allclose(table["raw_score"], saved["ranking_scores"], rtol=1e-5)
    anomalous = table["score"] >= 0.5
    assert (table["decision"] == np.where(anomalous, "anomalous", "normal")).all()
    if method == "dadda":  # its classifier names a defect type of the category
        assert set(table["defect_type"][anomalous]) <= set(defect_types_of(run.cfg))
        assert (table["defect_type"][~anomalous] == "good").all()
    else:
        assert (table["defect_type"] == "").all()
    for row in table.itertuples():
        mask = np.asarray(Image.open(tmp_path / "out" / row.mask))
        assert Image.open(tmp_path / "out" / row.overlay).size == Image.open(row.path).size
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert (tmp_path / "out" / "most_anomalous.png").is_file()


def test_the_head_scorer_calibrates_as_the_runs_score_scale(finished):
    scorer = load_scorer(open_run(finished("memorybank")))
    scale = scorer.scale
    scores = scale.image_threshold + scale.image_scale * np.linspace(-6, 6, 13)
    maps = scale.pixel_threshold + scale.pixel_scale * np.linspace(-6, 6, 2 * 32 * 32)
    maps = maps.reshape(2, 32, 32).astype(np.float32)
    got = scorer.calibrate(torch.from_numpy(scores).float(), torch.from_numpy(maps))
    want = ScoreScale.apply(scale, maps, scores)
    np.testing.assert_allclose(got[0].numpy(), want[1], atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), want[0], atol=1e-6)


@pytest.mark.parametrize("sigma, shape", [(2.0, (32, 32)), (0.5, (16, 16)), (3.0, (8, 8)),
                                          (0.0, (8, 8)), (2.5, (12, 20))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_maps_smoothing_is_scipys_gaussian_filter(sigma, shape, dtype):
    maps = (np.random.default_rng(0).random((3, *shape)) * 10 ** np.linspace(0, 4, 3)[:, None,
                                                                                    None])
    maps = maps.astype(dtype)
    smoothed = smooth_maps(maps, sigma)
    assert smoothed.dtype == dtype and smoothed.shape == maps.shape
    want = np.stack([gaussian_filter(m, sigma) for m in maps]) if sigma else maps
    np.testing.assert_allclose(smoothed, want, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_inputs_are_files_folders_or_an_mvtec_category(dataset, tmp_path):
    category = dataset / "washer"
    tests = sorted((category / "test").rglob("*.png"))
    assert collect_inputs([category]) == tests  # its test images, not train/ or ground_truth/
    one = tests[0]
    assert collect_inputs([one, category / "test" / "good", one])[0] == one
    assert len(collect_inputs([one, category / "test" / "good"])) == 1 + len(
        list((category / "test" / "good").glob("*.png"))) - (one.parent.name == "good")
    with pytest.raises(InputError, match=r"nowhere\.png: no such file"):
        collect_inputs([tmp_path / "nowhere.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no image files"):
        collect_inputs([tmp_path / "empty"])


def test_a_corrupt_png_among_good_ones_is_reported_on_one_line_and_skipped(
        finished, dataset, tmp_path, capsys):
    folder = tmp_path / "line"
    folder.mkdir()
    good = sorted((dataset / "washer" / "test" / "good").glob("*.png"))
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"good-{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:120])
    results = finished("msvt")
    assert main(["predict", str(results), str(folder), "--out", str(tmp_path / "out"),
                 "--threshold", "0"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2
    assert any("corrupt.png: unreadable image" in line for line in skipped)
    assert any("truncated.png: unreadable image" in line for line in skipped)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(table["path"].map(lambda p: p.rsplit("/", 1)[1])) == [
        f"good-{i}.png" for i in range(len(good))]
    assert (table["decision"] == "anomalous").all()  # --threshold 0 flags every image
    assert f"{len(good)} images scored, {len(good)} anomalous (score >= 0), 2 skipped" \
        in captured.out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_folder_without_a_checkpoint_or_of_an_unknown_method_fails_with_one_line(
        finished, dataset, tmp_path, capsys, monkeypatch):
    image = str(next((dataset / "washer" / "test" / "good").glob("*.png")))
    results = finished("mae")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(results / "config.yaml", bare / "config.yaml")
    assert main(["predict", str(bare), image, "--out", str(tmp_path / "o")]) == 1
    assert "checkpoints/latest.pt: not found (no checkpoint" in _one_error_line(capsys)
    assert main(["predict", str(results), image, "--out", str(tmp_path / "o"),
                 "--round", "7"]) == 1
    assert "round-007.pt: not found (rounds there: 1;" in _one_error_line(capsys)

    config = yaml.safe_load((results / "config.yaml").read_text())
    (bare / "config.yaml").write_text(yaml.safe_dump({**config, "method": "patchcore"}))
    assert main(["predict", str(bare), image, "--out", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys)
    assert "bare/config.yaml" in line and "method='patchcore'" in line
    monkeypatch.delitem(SCORERS, "mae")
    with pytest.raises(RunError, match=r"config.yaml: method='mae' has no scorer"):
        open_run(results)
    assert main(["predict", str(tmp_path / "nothing"), image, "--out", "o"]) == 1
    assert "nothing/config.yaml: not found" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused_in_one_line_and_cpu_scores_as_auto(finished):
    run = open_run(finished("memorybank"))
    with pytest.raises(RunError) as err:
        load_scorer(run, "cuda")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("device='cuda': no such device on this machine")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    on_cpu, on_auto = load_scorer(run, "cpu"), load_scorer(run, "auto")
    assert on_cpu.device == torch.device("cpu")
    for a, b in zip(on_cpu(images), on_auto(images), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
