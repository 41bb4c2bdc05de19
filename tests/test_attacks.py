"""Byzantine sites: what a malicious site replies, and the attack settings' validation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedad.attacks import AttackSettings, apply_attack
from fedad.config import ConfigError, ExperimentConfig


def _record(weight: float, bias: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), weight, np.float32)),
                        "b": Array(np.full(4, bias, np.float32)),
                        "count": Array(np.array([7], np.int64))})


@pytest.mark.parametrize(("attack", "factor"), [("scale", 5.0), ("sign-flip", -5.0)])
def test_malicious_site_replies_received_plus_factor_times_its_update(attack, factor):
    received, trained = _record(1.0, -2.0), _record(1.5, -1.0)
    settings = AttackSettings(attack=attack, attack_scale=5.0, malicious_partitions="0,3")
    for partition in (0, 3):
        sent = apply_attack(trained, received, partition, settings)
        np.testing.assert_allclose(sent["w"].numpy(), 1.0 + factor * 0.5)
        np.testing.assert_allclose(sent["b"].numpy(), -2.0 + factor * 1.0)
        assert sent["w"].numpy().dtype == np.float32 and sent["w"].numpy().shape == (2, 3)
        assert sent["count"].numpy().tolist() == [7]  # integer buffers are not scaled
        assert list(sent.keys()) == list(trained.keys())


def test_honest_sites_and_attack_none_reply_what_they_trained():
    received, trained = _record(1.0, 0.0), _record(2.0, 1.0)
    assert apply_attack(trained, received, 1, AttackSettings("scale", 5.0, "0")) is trained
    assert apply_attack(trained, received, 0, AttackSettings("none", 5.0, "0")) is trained


def test_mismatched_arrays_are_refused():
    received = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    trained = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32))})
    with pytest.raises(ValueError, match="shape"):
        apply_attack(trained, received, 0, AttackSettings("scale", 2.0, "0"))
    with pytest.raises(ValueError, match=r"trained arrays \['v'\] were not received"):
        apply_attack(ArrayRecord({"v": Array(np.zeros(2, np.float32))}), received, 0,
                     AttackSettings("scale", 2.0, "0"))


def test_a_site_replying_part_of_the_model_is_attacked_on_that_part():
    # NexViTAD's sites reply only the parameters they trained (a subset of the global model)
    received, trained = _record(1.0, -2.0), _record(1.5, -1.0)
    part = ArrayRecord({"b": trained["b"]})
    sent = apply_attack(part, received, 0, AttackSettings("scale", 4.0, "0"))
    assert list(sent.keys()) == ["b"]
    np.testing.assert_allclose(sent["b"].numpy(), -2.0 + 4.0 * 1.0)


@pytest.mark.parametrize(("key", "value"), [("attack", "flip"), ("attack-scale", -1.0),
                                            ("malicious-partitions", "0,x")])
def test_bad_attack_settings_name_the_key(key, value):
    cfg = ExperimentConfig(extra={key: value})
    with pytest.raises(ConfigError, match=key):
        cfg.section(AttackSettings)


def test_settings_are_read_from_run_config():
    cfg = ExperimentConfig.from_run_config({"attack": "sign-flip", "attack-scale": 3,
                                            "malicious-partitions": "2, 4"})
    settings = cfg.section(AttackSettings)
    assert settings.malicious == {2, 4} and settings.factor == -3.0
    assert settings.is_malicious(4) and not settings.is_malicious(0)


def test_a_malicious_site_replies_its_flipped_update(tmp_path):
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from clients import create_client
    from fedad.data import generate_dataset
    from fedad.task import build_model, model_to_arrays

    root = generate_dataset(tmp_path, categories=["washer"], num_train=8, num_test_good=2,
                            num_test_per_defect=2)
    honest = ExperimentConfig(data_path=str(root), category="washer", image_size=64,
                              local_epochs=1, max_train_batches=1, batch_size=4, backbone="none")
    attacked = honest.replace(extra={"attack": "sign-flip", "attack-scale": 2.0,
                                     "malicious-partitions": "1"})
    torch.manual_seed(0)
    received = model_to_arrays(build_model(honest))

    def sent(cfg, partition):
        content = RecordDict({"arrays": received, "config": ConfigRecord({"server-round": 1})})
        return create_client(cfg, partition, 2).train(content)["arrays"]

    trained = sent(honest, 1)  # training is seeded: the same update with or without attack
    flipped = sent(attacked, 1)
    for key in received:
        old = received[key].numpy()
        np.testing.assert_allclose(flipped[key].numpy(),
                                   old - 2.0 * (trained[key].numpy() - old), atol=1e-5)
    assert any(not np.allclose(trained[k].numpy(), received[k].numpy()) for k in received)
