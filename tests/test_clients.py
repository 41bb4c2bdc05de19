"""What one MSVT site does: local training, local validation, FedProx's proximal term."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients import create_client
from clients.model import validation_accuracy
from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.models import trainable_state_dict
from fedad.task import build_model, model_to_arrays
from fedad.train.predictions import Predictions


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=12, num_test_good=3, num_test_per_defect=3)
    return ExperimentConfig(data_path=str(root), category="washer", image_size=64,
                            local_epochs=2, max_train_batches=2, batch_size=4,
                            backbone="none")


def _content(arrays, config=None) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": config or ConfigRecord()})


def _train(client, arrays, config):
    reply = client.train(_content(arrays, config))
    return reply["arrays"], reply["metrics"]


def _distance(a, b) -> float:
    return sum(float(((a[k].numpy() - b[k].numpy()) ** 2).sum()) for k in a) ** 0.5


def test_train_replies_finite_arrays_of_the_global_shape(cfg):
    torch.manual_seed(0)
    initial = model_to_arrays(build_model(cfg))
    arrays, metrics = _train(create_client(cfg, 0, 2), initial, ConfigRecord({"server-round": 1}))
    assert list(arrays.keys()) == list(initial.keys())
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays)
    assert _distance(arrays, initial) > 0
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train_loss"])


def test_proximal_term_keeps_the_local_model_near_the_global_one(cfg):
    torch.manual_seed(0)
    initial = model_to_arrays(build_model(cfg))
    client = create_client(cfg.replace(lr=0.01), 0, 2)
    free, _ = _train(client, initial, ConfigRecord({"server-round": 1, "proximal-mu": 0.0}))
    held, _ = _train(client, initial, ConfigRecord({"server-round": 1, "proximal-mu": 100.0}))
    assert _distance(held, initial) < 0.9 * _distance(free, initial)


def test_evaluate_uses_the_local_validation_split(cfg):
    client = create_client(cfg, 1, 2)
    metrics = client.evaluate(_content(model_to_arrays(build_model(cfg))))["metrics"]
    assert metrics["num-examples"] == len(client.data.samples(1, "val")) > 0
    assert 0 <= metrics["val_pixel_accuracy"] <= 1


def test_evaluate_never_falls_back_to_training_data(cfg):
    client = create_client(cfg.replace(val_fraction=0.0), 0, 2)
    with pytest.raises(ValueError, match="no local validation samples"):
        client.evaluate(_content(model_to_arrays(build_model(cfg))))


def test_partition_id_out_of_range_is_refused(cfg):
    with pytest.raises(ValueError, match="partition-id=2"):
        create_client(cfg, 2, 2)


def test_trainable_state_excludes_nothing_without_a_frozen_backbone(cfg):
    model = build_model(cfg)
    assert set(trainable_state_dict(model)) == set(model.state_dict())


def test_a_message_type_the_method_does_not_handle_is_refused(cfg):
    with pytest.raises(ValueError, match=r"query\.upload-normals"):
        create_client(cfg, 0, 2).handle("query.upload-normals", RecordDict())


def test_train_reports_what_aca_and_cfa_ask_for(cfg):
    torch.manual_seed(0)
    initial = model_to_arrays(build_model(cfg))
    client = create_client(cfg, 1, 2)
    config = ConfigRecord({"server-round": 2, "report-validation": True, "send-prototype": True,
                           "cfa-weight": 0.5, "cfa-tau": 0.1, "cfa-anchor-dim": 128,
                           "cfa-anchors": [1.0] * 128 + [0.5] * 128,
                           "cfa-anchor-partitions": [0, 1]})
    _, metrics = _train(client, initial, config)
    assert 0 <= metrics["val_pixel_accuracy"] <= 1 and metrics["partition"] == 1
    for key in ("val_pixel_auroc", "val_pixel_ap", "val_image_auroc"):
        assert metrics[key] == -1.0 or 0 <= metrics[key] <= 1
    prototype = np.array(metrics["prototype"])
    assert prototype.shape == (128,) and np.linalg.norm(prototype) == pytest.approx(1.0, rel=1e-4)
    assert metrics["train_extra_loss"] > 0
    _, plain = _train(client, initial, ConfigRecord({"server-round": 2}))
    assert "prototype" not in plain and "val_pixel_accuracy" not in plain


def test_validation_metrics_rank_the_maps_and_mark_what_the_split_cannot_define():
    masks = np.zeros((4, 8, 8), np.float32)
    masks[2:, :2] = 1.0
    maps = masks * 0.1 + 0.3  # every defect pixel above every normal one, all below 0.5
    predictions = Predictions(maps=maps, masks=masks, labels=np.array([0, 0, 1, 1]),
                              image_scores=np.array([0.1, 0.6, 0.2, 0.9]),
                              defect_classes=np.zeros(4, np.int64),
                              images=np.zeros((4, 8, 8, 3), np.float32))
    metrics = validation_accuracy(predictions)
    assert metrics["val_pixel_auroc"] == pytest.approx(1.0)
    assert metrics["val_pixel_ap"] == pytest.approx(1.0)
    assert metrics["val_pixel_accuracy"] == pytest.approx(1 - masks.mean())  # threshold 0.5
    assert metrics["val_image_auroc"] == pytest.approx(0.75)
    normal = Predictions(maps=maps[:2], masks=masks[:2], labels=np.zeros(2, np.int64),
                         image_scores=np.array([0.1, 0.6]), defect_classes=np.zeros(2, np.int64),
                         images=np.zeros((2, 8, 8, 3), np.float32))
    undefined = validation_accuracy(normal)
    assert undefined["val_pixel_ap"] == undefined["val_image_auroc"] == -1.0
