"""The feature-head server workflow with in-process sites: rounds, results folder, what
crossed, refused payloads, the cross-domain (by-category) setting."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, Message

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset, scan_category
from fedad.heads.registry import head_settings
from fedad.inprocess import FIRST_NODE_ID, InProcessGrid, run_in_process
from fedad.metrics import METRIC_NAMES

SMALL = {"image-size": 64, "num-prototypes": 8, "gmm-components": 2, "gmm-covariance": "diag",
         "flow-blocks": 2, "flow-hidden": 32, "flow-epochs": 1, "max-patches": 2000,
         "plot-every-round": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer", "brick"],
                            num_train=10, num_test_good=3, num_test_per_defect=2)


def config(dataset, results, **overrides):
    values = {**SMALL, "data-path": str(dataset), "category": "washer",
              "results-dir": str(results), "num-server-rounds": 2, **overrides}
    return ExperimentConfig.from_run_config(values)


def crossings(results):
    return [json.loads(line) for line in (results / "payloads.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, kinds", [("memorybank", ("prototypes", "cluster-stats")),
                                           ("gmm", ("mixture", "em-stats")),
                                           ("flow", ("flow", "flow"))])
def test_two_rounds_write_the_results_folder_and_only_statistics_cross(dataset, tmp_path,
                                                                       method, kinds):
    results = tmp_path / "results"
    summary = run_in_process(config(dataset, results, method=method), 2)
    assert summary["method"] == method and summary["rounds"] == 2 and summary["num_clients"] == 2
    for name in ("config.yaml", "partitions.csv", "rounds.csv", "summary.json", "scores.npz",
                 "checkpoints/round-001.pt", "checkpoints/round-002.pt",
                 "plots/anomaly_maps.png"):
        assert (results / name).is_file(), name
    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    per_type = pd.read_csv(results / "defect_types.csv").set_index("defect_type")
    scores = np.load(results / "scores.npz")
    assert per_type["images"].sum() == len(scores["labels"]) and "good" in per_type.index
    assert per_type.drop(index="good")["image_auroc"].between(0, 1).all()
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert metric in METRIC_NAMES and rounds[metric].between(0, 1).all()
    rows = crossings(results)
    assert all(r["accepted"] for r in rows)
    train_rows = [r for r in rows if r["kind"] not in ("score-moments", "normal-map",
                                                       "score-range", "score-histogram")]
    assert [r["kind"] for r in train_rows] == (["feature-moments"] * 2 + [kinds[0]] * 2
                                               + [kinds[1]] * 2)
    maps = [r for r in rows if r["kind"] == "normal-map"]  # the map baseline, every round
    assert [r["round"] for r in maps] == [1, 1, 2, 2]
    assert all(r["shapes"] == {"mean": [64, 64]} for r in maps)
    assert "map_baseline" in torch.load(results / "checkpoints/round-002.pt")["state_dict"]
    num_patches = min(r["count"] for r in train_rows)
    for row in train_rows:  # no array has a row per patch: features never cross
        assert all(num_patches not in shape for shape in row["shapes"].values()), row


@pytest.mark.parametrize("key, kind", [("feature-whitening", "feature-moments"),
                                       ("map-baseline", "normal-map")])
def test_switched_off_statistics_do_not_cross(dataset, tmp_path, key, kind):
    results = tmp_path / "results"
    run_in_process(config(dataset, results, method="memorybank", **{"num-server-rounds": 1,
                                                                    key: False}), 2)
    assert kind not in {r["kind"] for r in crossings(results)}


class CorruptingGrid(InProcessGrid):
    """In-process sites, one of which sends NaN feature moments, prototypes and normal maps
    and one misshaped ones."""

    def _answer(self, msg: Message) -> Message:
        reply = super()._answer(msg)
        node = msg.metadata.dst_node_id
        name = {"train": "prototypes", "query.feature_moments": "second",
                "query.normal_map": "mean"}.get(msg.metadata.message_type)
        if name is not None and node != FIRST_NODE_ID:
            head = reply.content.array_records["head"]
            values = head[name].numpy().copy()
            if node == FIRST_NODE_ID + 1:
                values[0, 0] = np.nan
            else:
                values = values[:, :-1]
            head[name] = Array(values)
        return reply


def test_refused_payloads_are_logged_and_left_out(dataset, tmp_path):
    results = tmp_path / "results"
    cfg = config(dataset, results, method="memorybank", **{"num-server-rounds": 1,
                                                           "min-train-nodes": 1})
    from fedad.heads.workflow import run_feature_head

    summary = run_feature_head(CorruptingGrid(cfg, 3), cfg)
    for kind in ("feature-moments", "prototypes", "normal-map"):
        by_node = {r["node"]: r for r in crossings(results) if r["kind"] == kind}
        assert by_node[FIRST_NODE_ID]["accepted"]
        assert not by_node[FIRST_NODE_ID + 1]["accepted"]
        assert "non-finite" in by_node[FIRST_NODE_ID + 1]["reason"]
        assert not by_node[FIRST_NODE_ID + 2]["accepted"]
        assert "shape" in by_node[FIRST_NODE_ID + 2]["reason"]
    assert summary["final"]["train_sites"] == 1


def test_cross_domain_bank_from_source_categories_is_scored_on_the_target(dataset, tmp_path):
    results = tmp_path / "results"
    cfg = config(dataset, results, method="memorybank", category="washer,brick",
                 partitioner="by-category", **{"num-server-rounds": 1, "min-train-nodes": 1,
                                               "target-category": "washer"})
    summary = run_in_process(cfg, 2)
    rows = [r for r in crossings(results) if r["kind"] == "prototypes"]
    assert sorted(r["accepted"] for r in rows) == [False, True]  # the washer site abstains
    assert any("abstained" in r.get("reason", "") for r in rows)
    manifest = pd.read_csv(results / "partitions.csv")
    test_washer = ((manifest["partition"] == -1) & (manifest["category"] == "washer")).sum()
    assert len(np.load(results / "scores.npz")["labels"]) == test_washer
    assert 0 <= summary["final"]["image_auroc"] <= 1


def test_feature_scales_widen_the_statistics_that_cross(dataset, tmp_path):
    results = tmp_path / "results"
    run_in_process(config(dataset, results, method="memorybank", **{"num-server-rounds": 1,
                                                                    "feature-scales": "1,2"}), 2)
    moments = [r for r in crossings(results) if r["kind"] == "feature-moments"]
    assert moments and all(r["accepted"] for r in moments)
    width = 2 * (16 + 24 + 112)  # two scales of Lite0's levels 0, 1, 3
    assert all(width in shape for r in moments for shape in r["shapes"].values()), moments
    with pytest.raises(ConfigError, match="feature-scales='1,x'"):
        head_settings(config(dataset, results, **{"feature-scales": "1,x"}))
    with pytest.raises(ConfigError, match="feature-scales='0'"):
        head_settings(config(dataset, results, **{"feature-scales": "0"}))


def test_a_site_scores_its_normal_images_once_per_global_head(dataset, tmp_path, monkeypatch):
    from fedad.heads import site
    from fedad.heads.scoring import anomaly_maps, score_moments

    cfg = config(dataset, tmp_path / "results", method="memorybank")
    head = site.fit_or_refine(cfg, 0, 2, None)
    other = site.fit_or_refine(cfg, 1, 2, None)
    calls = []
    monkeypatch.setattr(site, "anomaly_maps", lambda *a, **k: calls.append(1) or anomaly_maps(
        *a, **k))
    sent = site.site_normal_map(cfg, 0, 2, head)
    assert len(calls) == 2  # training and validation images
    baseline = np.full((64, 64), 0.25, np.float32)
    moments = site.calibration_moments(cfg, 0, 2, head, baseline=baseline)
    assert len(calls) == 2  # the validation maps of the normal-map message, reused
    val = site.normal_patches(cfg, 0, 2, "val")
    fresh = anomaly_maps(site.head_for(cfg), head, val.features, 64,
                         site.head_settings(cfg).sigma(cfg.method, cfg.image_size))
    assert moments == pytest.approx(score_moments(fresh, site.head_settings(cfg), baseline))
    assert sent.count == len(fresh) + len(site.normal_patches(cfg, 0, 2, "train").labels)
    site.calibration_moments(cfg, 0, 2, other)  # another head: scored again
    assert len(calls) == 3


def test_a_site_whose_features_would_not_fit_refuses_before_extracting(dataset, tmp_path,
                                                                       monkeypatch):
    from fedad.heads import site
    from fedad.heads.registry import extractor_for, feature_grid
    from fedad.heads.scoring import PatchSet

    cfg = config(dataset, tmp_path / "results", method="memorybank")
    per_image = PatchSet.bytes_for(1, extractor_for(cfg).dim, feature_grid(cfg), 64)
    monkeypatch.setattr(site, "available_memory", lambda: int(per_image * 2))  # 2 of 4-5
    extracted = []
    monkeypatch.setattr(site, "extract_patches", lambda *a, **k: extracted.append(a))
    with pytest.raises(MemoryError, match=r"^partition 0: its \d+ normal train images need "
                       r"about .* GB .*image-size=64, feature-scales=\S+.* lower feature-scales"):
        site.normal_patches(cfg, 0, 2, "train")
    assert not extracted
    monkeypatch.setattr(site, "available_memory", lambda: int(per_image * 1000))
    site.normal_patches.cache_clear()
    site.normal_patches(cfg, 0, 2, "train")
    assert len(extracted) == 1


def test_patch_set_bytes_match_what_extraction_holds(dataset, tmp_path):
    from fedad.heads.registry import extractor_for, feature_grid
    from fedad.heads.scoring import PatchSet, extract_patches

    cfg = config(dataset, tmp_path / "results", method="memorybank")
    samples = [s for s in scan_category(dataset, "washer") if s.split == "train"][:3]
    patches = extract_patches(extractor_for(cfg), samples, cfg.image_size)
    held = sum(x.nbytes for x in (patches.features.numpy(), patches.images, patches.masks))
    maps = 3 * 4 * 64 * 64
    assert PatchSet.bytes_for(3, extractor_for(cfg).dim, feature_grid(cfg), 64) == held + maps


def test_padim_runs_one_round_whatever_num_server_rounds_says(dataset, tmp_path):
    results = tmp_path / "results"
    summary = run_in_process(config(dataset, results, method="padim", **{
        "num-server-rounds": 3, "gaussian-grid": 4, "gaussian-channels": 8}), 2)
    assert summary["rounds"] == 1
    assert pd.read_csv(results / "rounds.csv")["round"].tolist() == [1]
    assert {r["kind"] for r in crossings(results)} >= {"gaussian-stats"}
    assert max(r["round"] for r in crossings(results)) == 1
