"""NexViTAD (method=nexvitad): the adapter of eq. 1, the interleaving of eq. 3, the
pseudo-labels of eq. 6, the per-parameter aggregation of site-specific heads, the settings'
errors, a Hiera encoder from a local file, and a tiny in-process run with by-category sites
whose payloads are checked (the target site sends parameters, prototypes and counts, never
images or features)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.heads.features import build_extractor
from fedad.inprocess import run_in_process
from fedad.models.backbones import BackboneError
from fedad.nexvitad.aggregation import SiteKeyGuard, merge_per_key
from fedad.nexvitad.frozen import TRANSFORMS, restore, transform
from fedad.nexvitad.model import Adapter, interleave, load_encoder
from fedad.nexvitad.protocol import BANK_DIR, ENCODER_FILE
from fedad.nexvitad.settings import NexViTADSettings
from fedad.nexvitad.training import IGNORE, pseudo_labels, run_categories
from fedad.predict import load_scorer, open_run
from strategies import build_strategy

TINY = {"nexvitad-dino": "none", "nexvitad-dino-size": 28, "nexvitad-decoder-channels": "8,8,8",
        "num-prototypes": 8, "bank-clustering": "kmeans", "max-patches": 2000}
CATEGORIES = ["brick", "washer", "wood"]


def test_adapter_is_the_identity_at_zero_up_weights_and_keeps_shapes():
    adapter = Adapter(24)
    assert adapter.down.out_channels == 6 and adapter.up.in_channels == 6  # r = d / 4
    x = torch.randn(2, 24, 5, 7)
    assert torch.equal(adapter(x), x)  # W_up, b_up start at zero
    torch.nn.init.normal_(adapter.up.weight)
    y = adapter(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    expected = x + adapter.up(torch.nn.functional.gelu(adapter.down(x)))
    assert torch.allclose(y, expected)


def test_interleave_takes_channel_i_of_a_then_channel_i_of_b():
    a = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    b = 100 + torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = interleave(a, b)
    assert out.shape == (2, 6, 4, 4)
    assert out[0, :, 0, 0].tolist() == [0, 100, 1, 101, 2, 102]
    with pytest.raises(ValueError, match="differ"):
        interleave(a, b[:, :2])


def test_pseudo_labels_only_where_the_max_softmax_exceeds_theta():
    def logits_for(p_anomalous):  # two-class logits whose softmax gives p for class 1
        p = torch.tensor(p_anomalous)
        return torch.stack((torch.log1p(-p), torch.log(p))).view(1, 2, 1, -1)

    labels = pseudo_labels(logits_for([0.05, 0.29, 0.5, 0.69, 0.71, 0.95]), theta=0.7)
    assert labels.shape == (1, 1, 6)
    assert labels[0, 0].tolist() == [0, 0, IGNORE, IGNORE, 1, 1]
    assert pseudo_labels(logits_for([0.8]), theta=0.8)[0, 0].tolist() == [IGNORE]  # strict >


def test_views_are_restored_exactly():
    x = torch.randn(2, 3, 6, 6)
    for t in range(TRANSFORMS):
        assert torch.equal(restore(transform(x, t), t), x)
    assert len({transform(x, t).numpy().tobytes() for t in range(TRANSFORMS)}) == TRANSFORMS


def _reply(arrays: dict, examples: int, node: int = 1) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": examples})}),
                   reply_to=request)


def test_site_specific_heads_are_averaged_over_the_sites_that_trained_them_only(task_identity):
    reference = ArrayRecord({"shared": torch.zeros(2), "head_a": torch.zeros(2),
                             "head_b": torch.zeros(2), "head_c": torch.zeros(2)})
    replies = [_reply({"shared": torch.full((2,), 1.0), "head_a": torch.full((2,), 4.0)}, 1),
               _reply({"shared": torch.full((2,), 4.0), "head_b": torch.full((2,), 2.0)}, 3),
               _reply({"shared": torch.full((2,), 0.0), "head_b": torch.full((2,), 6.0)}, 1)]
    guard = SiteKeyGuard.around(build_strategy(ExperimentConfig(min_train_nodes=1)))
    guard.global_arrays = reference
    arrays, metrics = guard.aggregate_train(1, replies)
    merged = {k: arrays[k].numpy() for k in arrays}
    assert list(merged) == list(reference)
    np.testing.assert_allclose(merged["shared"], (1 + 12 + 0) / 5)  # FedAvg over all sites
    np.testing.assert_allclose(merged["head_a"], 4.0)  # one site: not diluted by the others
    np.testing.assert_allclose(merged["head_b"], (3 * 2 + 6) / 4)  # its two sites' mean
    np.testing.assert_allclose(merged["head_c"], 0.0)  # nobody trained it: kept
    assert metrics is not None
    assert [sorted(a) for a, _ in guard.trained] == [["head_a", "shared"], ["head_b", "shared"],
                                                     ["head_b", "shared"]]


def test_a_reply_with_unknown_keys_or_shapes_is_refused_not_merged(task_identity):
    reference = ArrayRecord({"shared": torch.zeros(2), "head": torch.zeros(2)})
    guard = SiteKeyGuard.around(build_strategy(ExperimentConfig(min_train_nodes=1)))
    guard.global_arrays = reference
    good = _reply({"shared": torch.ones(2), "head": torch.ones(2)}, 1)
    odd = _reply({"shared": torch.ones(2), "images": torch.ones(4, 3, 8, 8)}, 1)
    wrong = _reply({"shared": torch.ones(3)}, 1)
    arrays, _ = guard.aggregate_train(1, [good, odd, wrong])
    np.testing.assert_allclose(arrays["head"].numpy(), 1.0)
    np.testing.assert_allclose(arrays["shared"].numpy(), 1.0)
    assert len(guard.trained) == 1


def test_merge_keeps_integer_dtypes():
    reference = ArrayRecord({"count": torch.zeros(1, dtype=torch.int64)})
    merged = merge_per_key(reference, reference, [({"count": np.array([3])}, 1.0),
                                                  ({}, 1.0)])
    assert merged["count"].numpy().dtype == np.int64 and merged["count"].numpy()[0] == 3


@pytest.mark.parametrize("settings, key", [
    ({"nexvitad-theta": 0.3}, "nexvitad-theta"),
    ({"nexvitad-decoder-channels": "64,32"}, "nexvitad-decoder-channels"),
    ({"nexvitad-levels": "2"}, "nexvitad-levels"),
    ({"nexvitad-dino-size": 100}, "nexvitad-dino-size"),
    ({"nexvitad-dino-block": 12}, "nexvitad-dino-block"),
    ({"nexvitad-bank-levels": "0,7"}, "nexvitad-bank-levels"),
    ({"nexvitad-lambda-t": -1}, "nexvitad-lambda-t"),
    ({"nexvitad-encoder": "hiera_tiny_224"}, "nexvitad-encoder"),
    ({"nexvitad-dino": "file"}, "nexvitad-dino-checkpoint"),
    ({"nexvitad-mtl": "maybe"}, "nexvitad-mtl"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig(method="nexvitad", extra=settings).section(NexViTADSettings)
    assert str(caught.value).startswith(key) and "\n" not in str(caught.value)


def test_the_target_category_must_be_one_of_the_runs_categories(tmp_path):
    data = generate_dataset(tmp_path / "d", categories=["brick", "wood"], num_train=2,
                            num_test_good=1, num_test_per_defect=1, image_size=32)
    for target in ("", "gear"):
        cfg = ExperimentConfig(method="nexvitad", partitioner="by-category",
                               data_path=str(data), extra={"target-category": target})
        with pytest.raises(ConfigError, match=r"^target-category=") as caught:
            run_categories(cfg)
        assert "\n" not in str(caught.value)


def test_hiera_is_loaded_by_timm_name_from_a_local_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "hiera.pt"
    torch.save(timm.create_model("hiera_tiny_224", pretrained=False).state_dict(), path)
    settings = NexViTADSettings(nexvitad_encoder="hiera_tiny_224",
                                nexvitad_encoder_checkpoint=str(path), nexvitad_levels="0,1,2,3",
                                nexvitad_dino="none", nexvitad_dino_size=28)
    from fedad.nexvitad.model import NexViTADEncoder, frozen_streams

    encoder = NexViTADEncoder(frozen_streams(settings))
    with torch.no_grad():
        fused = encoder(torch.rand(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in fused] == [(192, 56, 56), (384, 28, 28), (768, 14, 14),
                                                   (1536, 7, 7)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """A 3-site by-category in-process run (sources brick, washer; target wood), 2 rounds."""
    root = tmp_path_factory.mktemp("nexvitad")
    data = generate_dataset(root / "data", categories=CATEGORIES, num_train=8, num_test_good=3,
                            num_test_per_defect=2, image_size=64)
    cfg = ExperimentConfig.from_run_config({
        **TINY, "method": "nexvitad", "partitioner": "by-category", "data-path": str(data),
        "category": ",".join(CATEGORIES), "target-category": "wood", "image-size": 64,
        "num-server-rounds": 2, "local-epochs": 1, "max-train-batches": 2, "batch-size": 4,
        "plot-every-round": False, "val-fraction": 0.2, "results-dir": str(root / "results"),
        "min-train-nodes": 3})
    return cfg, run_in_process(cfg, 3)


def test_tiny_run_trains_then_fills_the_bank_from_the_trained_encoder(tiny_run):
    cfg, summary = tiny_run
    assert summary["method"] == "nexvitad" and summary["rounds"] == 2
    final = summary["final"]
    for key in ("image_auroc", "pixel_auroc", "decoder_image_auroc", "target_image_auroc"):
        assert 0 <= final[key] <= 1, key
    assert final["train_pretraining"] == 0.0  # round 2 is joint training
    bank = json.loads((cfg.resolved_results_dir() / BANK_DIR / "summary.json").read_text())
    assert bank["method"] == "memorybank"
    assert bank["final"]["image_auroc"] == final["image_auroc"]


def _audit(folder):
    return [json.loads(line) for line in (folder / "payloads.jsonl").read_text().splitlines()]


def test_sites_send_only_what_they_trained_and_the_target_never_its_images(tiny_run):
    cfg, _ = tiny_run
    root = cfg.resolved_results_dir()
    rows = _audit(root)
    trained = {}
    for row in rows:
        if row["kind"] == "train":
            trained.setdefault(row["node"], set()).update(
                k.split(".")[0] if not k.startswith("heads.") else ".".join(k.split(".")[:2])
                for k in row["shapes"])
    # by-category: category k on site k % 3 (brick 1001, washer 1002, wood = target 1003)
    assert trained[1001] == {"encoder", "heads.brick", "pseudo_head"}
    assert trained[1002] == {"encoder", "heads.washer", "pseudo_head"}
    assert trained[1003] == {"encoder", "target_head"}
    bank = _audit(root / BANK_DIR)
    kinds = {r["kind"] for r in rows + bank if r["node"] == 1003 and r["accepted"]}
    assert kinds <= {"train", "evaluate", "query.nexvitad_encoder", "feature-moments",
                     "prototypes", "normal-map", "score-moments", "score-range",
                     "score-histogram"}
    side = cfg.image_size
    for row in rows + bank:
        for shape in (row["shapes"] or {}).values():
            assert shape[-2:] != [side, side] or len(shape) == 2, (row["kind"], shape)
            assert 3 not in shape[1:2] or len(shape) != 4, (row["kind"], shape)
    prototypes = [r for r in bank if r["kind"] == "prototypes" and r["accepted"]]
    assert [r["node"] for r in prototypes] == [1003]  # the target's normals fill the bank
    assert set(prototypes[0]["shapes"]) == {"prototypes", "counts"}


def test_the_trained_encoder_is_a_feature_source(tiny_run):
    cfg, _ = tiny_run
    path = cfg.resolved_results_dir() / "checkpoints" / ENCODER_FILE
    encoder = load_encoder(path)
    extractor = build_extractor("nexvitad", layers=(0, 1), neighbourhood=3, image_size=64,
                                pretrained="file", checkpoint=str(path))
    features = extractor(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, sum(encoder.widths[:2]), 16, 16)
    assert torch.isfinite(features).all()
    with pytest.raises(BackboneError, match="feature-layers"):
        build_extractor("nexvitad", layers=(9,), neighbourhood=3, image_size=64,
                        pretrained="file", checkpoint=str(path))
    with pytest.raises(BackboneError, match=r"^feature-source='nexvitad' needs"):
        build_extractor("nexvitad", layers=(0,), neighbourhood=3, image_size=64)


def test_predict_on_a_nexvitad_run_scores_with_its_bank(tiny_run):
    cfg, _ = tiny_run
    run = open_run(cfg.resolved_results_dir())
    assert run.cfg.method == "memorybank" and run.root.name == BANK_DIR
    scorer = load_scorer(run, device="cpu")
    scores, maps = scorer(torch.rand(2, 3, 64, 64))
    assert scores.shape == (2,) and maps.shape == (2, 64, 64)
    assert torch.isfinite(maps).all() and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("strategy", ["cfa", "fedmsvt"])
def test_strategies_that_align_msvt_embeddings_are_refused(strategy):
    from fedad.nexvitad.workflow import run_nexvitad

    cfg = ExperimentConfig(method="nexvitad", strategy=strategy)
    with pytest.raises(ConfigError, match=f"^strategy='{strategy}'"):
        run_nexvitad(None, cfg)
