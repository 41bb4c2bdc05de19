"""Federated decision thresholds (fedad.thresholds): the sketch's threshold equals the pooled
normal scores' quantile within its stated error; bad sketches are refused with a reason and
audited; a finished run (memorybank, msvt) writes thresholds.json, which ``fedad predict``
decides at; a resumed run ends with it too; a folder without it keeps 0.5."""

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny_runs import TINY_METHODS, TINY_RUN

from clients.base import SiteClient
from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.experiment import resolve_root
from fedad.heads.payload import Payload, PayloadError
from fedad.inprocess import run_in_process
from fedad.predict import Thresholds, load_scorer, open_run, predict_images, run_thresholds
from fedad.predict.inputs import read_batches
from fedad.predict.run import test_split as run_test_split
from fedad.thresholds import (
    BINS,
    SCALES,
    SCORE_HISTOGRAM,
    SCORE_RANGE,
    THRESHOLDS_FILE,
    ThresholdSettings,
    bin_edges,
    check_histogram,
    check_range,
    fpr_threshold,
    histogram,
    histogram_payload,
    pooled_range,
    pooled_thresholds,
    range_payload,
    read_payload,
)
from partitions import partition_samples, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8  # the maps' side in the unit tests


def _site_values(rng, count: int, image, pixel) -> dict[str, np.ndarray]:
    """One site's calibrated values, float32 as a scorer's: image scores [count], maps
    [count, SIZE, SIZE]."""
    return {"image": image(rng, count).astype(np.float32),
            "pixel": pixel(rng, (count, SIZE, SIZE)).astype(np.float32)}


SITES = (  # three sites, three different score distributions and sizes
    (137, lambda r, n: r.beta(2, 8, n), lambda r, s: r.beta(1, 12, s)),
    (251, lambda r, n: 0.3 + 0.05 * r.standard_normal(n), lambda r, s: r.uniform(0, 0.4, s)),
    (93, lambda r, n: r.uniform(0.5, 0.9, n), lambda r, s: r.exponential(0.05, s)),
)


def _federated(sites: list[dict[str, np.ndarray]], fpr: float, bins: int = BINS):
    """The two exchanges as the server runs them, each payload through its record and
    checks: (pooled ranges, per-scale thresholds)."""
    ranges = []
    for values in sites:
        payload = read_payload(range_payload(values, len(values["image"])).to_record(),
                               SCORE_RANGE, 2)
        check_range(payload)
        ranges.append(payload)
    pooled = pooled_range(ranges)
    edges = {name: bin_edges(*pooled[name], bins) for name in SCALES}
    histograms = []
    for values, reported in zip(sites, ranges, strict=True):
        payload = read_payload(histogram_payload(values, reported.count, edges).to_record(),
                               SCORE_HISTOGRAM, bins)
        check_histogram(payload, reported.count, SIZE * SIZE)
        histograms.append(payload)
    return pooled, pooled_thresholds(histograms, pooled, bins, fpr)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("bins", [BINS, 64])
def test_the_federated_threshold_is_the_pooled_quantile_within_one_bin(fpr, bins):
    rng = np.random.default_rng(7)
    sites = [_site_values(rng, count, image, pixel) for count, image, pixel in SITES]
    pooled, scales = _federated(sites, fpr, bins)
    for name in SCALES:
        values = np.concatenate([site[name].ravel() for site in sites])
        exact = np.quantile(values, 1 - fpr, method="inverted_cdf")
        got = scales[name]
        width = (values.max() - values.min()) / bins
        assert list(pooled[name]) == [values.min(), values.max()]
        assert got["error_bound"] == pytest.approx(width, rel=1e-9)
        step = np.spacing(np.float32(got["threshold"]))
        assert exact < got["threshold"] <= exact + width * (1 + 1e-9) + step, name
        assert got["threshold"] == np.float32(got["threshold"])
        fpr_at = np.mean(values >= got["threshold"])
        assert got["normal_fpr"] == fpr_at <= fpr
        assert fpr_at == np.mean(values >= np.float32(got["threshold"]))  # float32 alike
        assert got["normal_values"] == values.size


@pytest.mark.parametrize("value", [0.25, 0.1])
def test_equal_values_put_the_threshold_just_above_them(value):
    value = float(np.float32(value))
    counts = histogram(np.full(5, value, np.float32), bin_edges(value, value, BINS))
    assert counts.sum() == 5
    threshold, share = fpr_threshold(counts, bin_edges(value, value, BINS), 0.01)
    assert threshold == np.nextafter(np.float32(value), np.float32(1)) and share == 0


def _range(image=(0.1, 0.4), pixel=(0.0, 0.9), count=3) -> Payload:
    return Payload(SCORE_RANGE.kind, {"image": np.array(image, np.float64),
                                      "pixel": np.array(pixel, np.float64)}, count)


def _counts(bins=BINS, count=3, change=None) -> Payload:
    arrays = {"image": np.zeros(bins), "pixel": np.zeros(bins)}
    arrays["image"][0], arrays["pixel"][-1] = count, count * SIZE * SIZE
    if change is not None:
        change(arrays)
    return Payload(SCORE_HISTOGRAM.kind, arrays, count)


def _set(name, index, value):
    def change(arrays):
        arrays[name][index] += value
    return change


@pytest.mark.parametrize("payload, query, length, reason", [
    (_range(image=(np.nan, 0.4)), SCORE_RANGE, 2, "image has non-finite"),
    (_range(pixel=(0.9, 0.2)), SCORE_RANGE, 2, "pixel min 0.9 > max 0.2"),
    (_range(count=0), SCORE_RANGE, 2, "num-examples=0 must be > 0"),
    (_counts(bins=100), SCORE_HISTOGRAM, BINS, r"image shape \[100\] != \[2048\]"),
    (_counts(change=_set("pixel", 5, -1.0)), SCORE_HISTOGRAM, BINS,
     "pixel counts must be non-negative integers"),
    (_counts(change=_set("image", 0, -0.5)), SCORE_HISTOGRAM, BINS,
     "image counts must be non-negative integers"),
    (_counts(change=_set("image", 3, 1.0)), SCORE_HISTOGRAM, BINS,
     "image counts add up to 4, expected 3"),
    (_counts(count=4), SCORE_HISTOGRAM, BINS, "4 images, its range reply had 3"),
    (_counts(change=_set("pixel", 2, np.inf)), SCORE_HISTOGRAM, BINS, "pixel has non-finite"),
])
def test_a_bad_sketch_is_refused_with_its_reason(payload, query, length, reason):
    with pytest.raises(PayloadError, match=reason):
        checked = read_payload(payload.to_record(), query, length)
        if query == SCORE_RANGE:
            check_range(checked)
        else:
            check_histogram(checked, 3, SIZE * SIZE)


def test_a_payload_of_the_other_kind_is_refused():
    record = _range().to_record()
    record["meta"]["kind"] = SCORE_HISTOGRAM.kind
    with pytest.raises(PayloadError, match="payload kind 'score-histogram', expected"):
        read_payload(record, SCORE_RANGE, 2)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1])
def test_threshold_fpr_must_lie_in_the_open_unit_interval(fpr):
    with pytest.raises(ConfigError, match=f"threshold-fpr={fpr}"):
        ExperimentConfig.from_run_config({"threshold-fpr": fpr}).section(ThresholdSettings)


# --- runs --------------------------------------------------------------------------------

TINY = {**TINY_RUN, "val-fraction": 0.3, "threshold-fpr": 0.05}
METHODS = {m: TINY_METHODS[m] for m in ("memorybank", "msvt")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=16, num_test_good=3, num_test_per_defect=1, image_size=32)


def _cfg(dataset, results, method="memorybank", **changes) -> ExperimentConfig:
    return ExperimentConfig.from_run_config({
        **TINY, **METHODS[method], "data-path": str(dataset), "category": "washer",
        "results-dir": str(results), **changes})


@pytest.fixture(scope="module")
def finished(dataset, runs_once):
    """method -> the results folder of a finished one-round run of it (run once)."""
    return runs_once(lambda method, folder: _cfg(dataset, folder, method))


def _audit(results) -> pd.DataFrame:
    return pd.read_json(results / "payloads.jsonl", lines=True)


def _held_out_normal_values(run) -> dict[str, np.ndarray]:
    """The calibrated image scores and map values of every site's held-out normal images,
    pooled, as the run's scorer gives them (computed here, on the whole data)."""
    manifest = read_manifest(run.root / "partitions.csv")
    paths = [s.image_path for site in sorted(set(manifest["partition"]) - {-1})
             for s in partition_samples(manifest, site, "val", resolve_root(run.cfg))
             if s.label == 0]
    scorer, scores, maps = load_scorer(run), [], []
    for batch in read_batches(paths, run.cfg.image_size, 4, []):
        batch_scores, batch_maps = scorer(batch.images)
        scores.append(batch_scores.detach().double().numpy())
        maps.append(batch_maps.detach().numpy().ravel())
    return {"image": np.concatenate(scores), "pixel": np.concatenate(maps)}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_writes_thresholds_that_predict_decides_at(finished, tmp_path, method):
    results = finished(method)
    saved = json.loads((results / THRESHOLDS_FILE).read_text())
    run = open_run(results)
    assert saved["threshold_fpr"] == 0.05 and saved["bins"] == BINS and saved["round"] == 1
    assert saved["sites"] == [1001, 1002]
    pooled = _held_out_normal_values(run)
    assert saved["normal_images"] == len(pooled["image"]) > 0
    for name in SCALES:  # the sites' sketch = the pooled data's quantile within one bin
        values, got = pooled[name], saved[name]
        exact = np.quantile(values, 1 - 0.05, method="inverted_cdf")
        assert got["normal_values"] == values.size
        step = np.spacing(np.float32(got["threshold"]))
        assert exact < got["threshold"] <= exact + got["error_bound"] * (1 + 1e-6) + step
        assert np.mean(values >= got["threshold"]) == got["normal_fpr"] <= 0.05
    summary = json.loads((results / "summary.json").read_text())
    assert summary["thresholds"] == {"threshold_fpr": 0.05, "image": saved["image"]["threshold"],
                                     "pixel": saved["pixel"]["threshold"]}
    test = np.load(results / "scores.npz")
    assert test["labels"].sum() > 0 and saved["test_f1_max"]["image_threshold"] in set(
        test["image_scores"].astype(float))  # reported from the test split, not used
    audit = _audit(results)
    sketches = audit[audit["kind"].isin([SCORE_RANGE.kind, SCORE_HISTOGRAM.kind])]
    assert len(sketches) == 4 and sketches["accepted"].all()
    assert {tuple(v) for s in sketches["shapes"] for v in s.values()} == {(2,), (BINS,)}

    thresholds = run_thresholds(run)
    assert thresholds == Thresholds(saved["image"]["threshold"], saved["pixel"]["threshold"])
    paths = [s.image_path for s in run_test_split(run)]
    table = predict_images(load_scorer(run), paths, tmp_path / "out", thresholds,
                           batch_size=3, progress=False).table
    anomalous = table["score"] >= thresholds.image
    assert (table["decision"] == np.where(anomalous, "anomalous", "normal")).all()
    scorer = load_scorer(run)
    for row in table.head(3).itertuples():  # the masks are the maps at the pixel threshold
        _, maps = scorer(next(read_batches([row.path], 32, 1, [])).images)
        mask = np.asarray(Image.open(tmp_path / "out" / row.mask)) > 0
        assert (mask == (maps[0].detach().numpy() >= thresholds.pixel)).all()


def test_a_folder_without_thresholds_keeps_one_half_and_says_so(finished, tmp_path, caplog):
    folder = tmp_path / "older"
    shutil.copytree(finished("memorybank"), folder)
    (folder / THRESHOLDS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="fedad.predict.run"):
        assert run_thresholds(open_run(folder)) == Thresholds(0.5, 0.5)
    assert [r.message for r in caplog.records if THRESHOLDS_FILE in r.message] == [
        f"{folder / THRESHOLDS_FILE}: not found (a run before federated thresholds, or "
        "without held-out normal images): thresholds 0.5"]


def test_a_run_resumed_after_its_last_round_ends_with_the_same_thresholds(finished, tmp_path):
    folder = tmp_path / "resumed"
    shutil.copytree(finished("memorybank"), folder)
    before = json.loads((folder / THRESHOLDS_FILE).read_text())
    (folder / THRESHOLDS_FILE).unlink()
    (folder / "summary.json").unlink()
    cfg = ExperimentConfig.from_yaml(folder / "config.yaml")
    run_in_process(cfg.replace(resume_from=str(folder)), 2)
    after = json.loads((folder / THRESHOLDS_FILE).read_text())
    assert {k: after[k] for k in (*SCALES, "sites", "round")} == {
        k: before[k] for k in (*SCALES, "sites", "round")}


def _bad_histogram(partitions):
    """A site handler that sends NaN counts from ``partitions`` (the others answer)."""
    honest = SiteClient.query_threshold_histogram

    def reply(self, content):
        record = honest(self, content)
        if self.partition_id not in partitions:
            return record
        arrays = {name: record["head"][name].numpy().copy() for name in SCALES}
        arrays["image"][0] = np.nan
        return Payload(SCORE_HISTOGRAM.kind, arrays,
                       int(record["metrics"]["num-examples"])).to_record()

    return reply


def test_a_bad_sketch_is_audited_and_left_out_the_run_goes_on(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(SiteClient, "query_threshold_histogram", _bad_histogram({1}))
    results = tmp_path / "run"
    run_in_process(_cfg(dataset, results), 2)
    saved = json.loads((results / THRESHOLDS_FILE).read_text())
    assert saved["sites"] == [1001]
    rows = _audit(results)
    refused = rows[(rows["kind"] == SCORE_HISTOGRAM.kind) & ~rows["accepted"]]
    assert refused["node"].tolist() == [1002]
    assert "image has non-finite or non-float values" in refused["reason"].iloc[0]


def test_a_run_fails_with_one_line_when_no_site_sends_a_usable_sketch(dataset, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(SiteClient, "query_threshold_histogram", _bad_histogram({0, 1}))
    results = tmp_path / "run"
    with pytest.raises(RuntimeError, match="no site sent a usable score histogram") as err:
        run_in_process(_cfg(dataset, results), 2)
    assert "\n" not in str(err.value) and not (results / THRESHOLDS_FILE).exists()
    rows = _audit(results)
    assert (~rows.loc[rows["kind"] == SCORE_HISTOGRAM.kind, "accepted"]).sum() == 2


def test_without_held_out_images_nothing_is_sent_and_no_file_is_written(dataset, tmp_path):
    results = tmp_path / "run"
    summary = run_in_process(_cfg(dataset, results, **{"val-fraction": 0.0}), 2)
    assert "thresholds" not in summary and not (results / THRESHOLDS_FILE).exists()
    assert not _audit(results)["kind"].isin([SCORE_RANGE.kind, SCORE_HISTOGRAM.kind]).any()
