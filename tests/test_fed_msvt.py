"""Fed-MSVT's mechanisms: Adaptive Client Aggregation (eqs. 3-6) and Contrastive Feature
Alignment (eq. 7), on hand-made updates and small tensors."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedad.config import ConfigError, ExperimentConfig
from fedad.msvt.protocol import UNDEFINED
from fedad.train.contrastive import alignment_loss, info_nce, normal_prototype
from strategies import build_strategy
from strategies.aca import QUALITY_METRICS, AdaptiveClientAggregation, combine_weights
from strategies.cfa import ContrastiveAlignment
from strategies.statistics import strategy_chain

pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    def get_node_ids(self):
        return list(range(1, 6))


def _reply(node: int, values: np.ndarray, **metrics) -> Message:
    out = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    record = ArrayRecord([values.astype(np.float32)])
    metrics = {"num-examples": 10, "partition": node, **metrics}
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=out)


def _strategy(name="aca", **settings):
    cfg = ExperimentConfig.from_run_config({"strategy": name, **settings})
    return build_strategy(cfg)


def _part(strategy, cls):
    return next(s for s in strategy_chain(strategy) if isinstance(s, cls))


def _train_round(strategy, server_round, global_values, replies):
    configured = list(strategy.configure_train(
        server_round, ArrayRecord([global_values.astype(np.float32)]), ConfigRecord(), _Grid()))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return configured, arrays, metrics


UPDATES = {1: np.array([0.1, -0.1, 0.2, 0.0]), 2: np.array([1.0, -2.0, 0.5, 3.0]),
           3: np.array([0.3, 0.3, -0.3, 0.1])}
QUALITY = {1: 0.9, 2: 0.8, 3: 0.6}


def test_aca_weights_equal_eqs_3_to_5_by_hand():
    strategy = _strategy()
    glob = np.zeros(4)
    replies = [_reply(n, glob + u, val_pixel_ap=QUALITY[n]) for n, u in UPDATES.items()]
    configured, arrays, _ = _train_round(strategy, 1, glob, replies)
    assert all(m.content["config"]["report-validation"] for m in configured)
    # Round 1: theta_i^{t-1} is the global model the site started from.
    s = {n: 1 / np.var(u.astype(np.float32).astype(np.float64)) for n, u in UPDATES.items()}
    raw = {n: QUALITY[n] * s[n] for n in UPDATES}
    expected = {n: raw[n] / sum(raw.values()) for n in UPDATES}
    log = {row["node"]: row for row in _part(strategy, AdaptiveClientAggregation).weight_log}
    for n in UPDATES:
        assert log[n]["weight"] == pytest.approx(expected[n], rel=1e-6)
        assert log[n]["q"] == QUALITY[n] and log[n]["s"] == pytest.approx(s[n], rel=1e-6)
    average = sum(expected[n] * (glob + UPDATES[n]) for n in UPDATES)
    np.testing.assert_allclose(arrays["0"].numpy(), average, rtol=1e-5, atol=1e-6)


def test_aca_stability_uses_each_nodes_previous_reply():
    strategy = _strategy(**{"aca-quality": False})
    glob = np.zeros(4)
    _train_round(strategy, 1, glob, [_reply(n, u) for n, u in UPDATES.items()])
    second = {1: UPDATES[1] + 0.5 * np.array([1, -1, 1, -1]), 2: UPDATES[2] * 1.01,
              3: UPDATES[3] + np.array([0.0, 0.1, 0.0, 0.2])}
    _train_round(strategy, 2, np.ones(4), [_reply(n, v) for n, v in second.items()])
    s = {n: 1 / np.var((second[n].astype(np.float32) - UPDATES[n].astype(np.float32))
                       .astype(np.float64)) for n in second}
    rows = [r for r in _part(strategy, AdaptiveClientAggregation).weight_log if r["round"] == 2]
    for row in rows:
        assert row["weight"] == pytest.approx(s[row["node"]] / sum(s.values()), rel=1e-5)
    assert max(rows, key=lambda r: r["weight"])["node"] == 2  # the steadiest site leads


def test_a_nan_update_or_metric_gets_weight_zero_and_the_model_stays_finite():
    strategy = _strategy()
    glob = np.zeros(4)
    replies = [_reply(1, glob + UPDATES[1], val_pixel_ap=0.9),
               _reply(2, np.array([np.nan, 0, 0, 0]), val_pixel_ap=0.9),
               _reply(3, glob + UPDATES[3], val_pixel_ap=float("inf")),
               _reply(4, glob + UPDATES[2])]  # no q_i reported
    _, arrays, _ = _train_round(strategy, 1, glob, replies)
    assert np.isfinite(arrays["0"].numpy()).all()
    refused = {row["node"] for row in strategy.audit.rows if not row["accepted"]}
    assert refused == {2, 3}
    log = {row["node"]: row for row in _part(strategy, AdaptiveClientAggregation).weight_log}
    assert log[4]["weight"] == 0 and "val_pixel_ap" in log[4]["reason"]
    np.testing.assert_allclose(arrays["0"].numpy(), UPDATES[1], rtol=1e-6)


@pytest.mark.parametrize("metric", ["pixel-accuracy", "pixel-auroc", "image-auroc"])
def test_aca_quality_metric_chooses_which_validation_metric_is_q(metric):
    key = QUALITY_METRICS[metric]
    strategy = _strategy(**{"aca-quality-metric": metric, "aca-stability": False})
    decoy = {k: 0.5 for k in QUALITY_METRICS.values() if k != key}
    replies = [_reply(n, UPDATES[n], **decoy, **{key: QUALITY[n]}) for n in UPDATES]
    _train_round(strategy, 1, np.zeros(4), replies)
    log = {row["node"]: row for row in _part(strategy, AdaptiveClientAggregation).weight_log}
    total = sum(QUALITY.values())
    for n in UPDATES:
        assert log[n]["q"] == QUALITY[n]
        assert log[n]["weight"] == pytest.approx(QUALITY[n] / total, rel=1e-6)


def test_a_split_that_cannot_define_q_gets_the_others_mean():
    strategy = _strategy(**{"aca-stability": False})
    replies = [_reply(1, UPDATES[1], val_pixel_ap=0.8), _reply(2, UPDATES[2], val_pixel_ap=0.4),
               _reply(3, UPDATES[3], val_pixel_ap=UNDEFINED)]
    _train_round(strategy, 1, np.zeros(4), replies)
    log = {row["node"]: row for row in _part(strategy, AdaptiveClientAggregation).weight_log}
    assert log[3]["q"] == pytest.approx(0.6) and not log[3]["reason"]
    assert log[3]["weight"] == pytest.approx(0.6 / 1.8)


def test_an_unknown_quality_metric_is_refused_by_name():
    with pytest.raises(ConfigError, match="aca-quality-metric='f1'"):
        _strategy(**{"aca-quality-metric": "f1"})


def test_no_positive_weight_keeps_the_global_model():
    strategy = _strategy()
    arrays, _ = _train_round(strategy, 1, np.zeros(4), [_reply(1, UPDATES[1],
                                                                val_pixel_ap=0.0)])[1:]
    assert arrays is None


def test_count_mix_and_floor():
    raw, counts = np.array([3.0, 1.0, 0.0]), np.array([10.0, 30.0, 50.0])
    np.testing.assert_allclose(combine_weights(raw, counts, 0.0, 0.0), [0.75, 0.25, 0])
    np.testing.assert_allclose(combine_weights(raw, counts, 0.5, 0.0),
                               [0.5 * 0.75 + 0.5 * 0.25, 0.5 * 0.25 + 0.5 * 0.75, 0])
    floored = combine_weights(np.array([1.0, 1e-9]), np.ones(2), 0.0, 0.2)
    assert floored.min() >= 0.2 - 1e-12 and floored.sum() == pytest.approx(1.0)


def test_domain_factor_uses_the_prototypes():
    strategy = _strategy(**{"aca-quality": False, "aca-stability": False, "aca-domain": True})
    replies = [_reply(1, UPDATES[1], prototype=[1.0, 0.0]),
               _reply(2, UPDATES[2], prototype=[1.0, 0.0]),
               _reply(3, UPDATES[3], prototype=[-1.0, 0.1])]
    configured, _, _ = _train_round(strategy, 1, np.zeros(4), replies)
    assert configured[0].content["config"]["send-prototype"]
    center = np.array([1.0 / 3, 0.1 / 3])
    d = {n: (1 + np.dot(p, center) / np.linalg.norm(p) / np.linalg.norm(center)) / 2
         for n, p in ((1, np.array([1.0, 0.0])), (2, np.array([1.0, 0.0])),
                      (3, np.array([-1.0, 0.1])))}
    log = {row["node"]: row for row in _part(strategy, AdaptiveClientAggregation).weight_log}
    for n in d:
        assert log[n]["weight"] == pytest.approx(d[n] / sum(d.values()), rel=1e-6)


def test_aca_composes_with_flower_server_optimizers():
    glob = np.zeros(4)

    def run(**settings):
        replies = [_reply(n, glob + u, val_pixel_ap=QUALITY[n]) for n, u in UPDATES.items()]
        return _train_round(_strategy(**settings), 1, glob, replies)[1]["0"].numpy()

    plain = run()
    np.testing.assert_allclose(
        run(**{"base-strategy": "fedavgm", "server-lr": 1.0, "server-momentum": 0.0}), plain,
        rtol=1e-5)
    adam = run(**{"base-strategy": "fedadam", "server-lr": 0.1})
    assert np.isfinite(adam).all() and not np.allclose(adam, plain)
    with pytest.raises(ConfigError, match="base-strategy"):
        _strategy(**{"base-strategy": "krum"})
    with pytest.raises(ConfigError, match="aca-floor"):
        _strategy(**{"aca-floor": 1.5})


def test_cfa_broadcasts_the_other_sites_prototypes_and_strips_them_before_fedavg():
    strategy = _strategy("fedmsvt")
    glob = np.zeros(4)
    replies = [_reply(n, glob + u, val_pixel_ap=QUALITY[n], prototype=[float(n), 1.0])
               for n, u in UPDATES.items()]
    first, _, metrics = _train_round(strategy, 1, glob, replies)
    assert "cfa-anchors" not in first[0].content["config"]
    assert first[0].content["config"]["cfa-weight"] == pytest.approx(0.1)
    assert "prototype" not in metrics and "partition" not in metrics
    second = list(strategy.configure_train(2, ArrayRecord([glob.astype(np.float32)]),
                                           ConfigRecord(), _Grid()))
    config = second[0].content["config"]
    assert config["cfa-anchor-partitions"] == [1, 2, 3]
    np.testing.assert_allclose(np.array(config["cfa-anchors"]).reshape(3, 2),
                               [[1, 1], [2, 1], [3, 1]])
    assert _part(strategy, ContrastiveAlignment).state_dict()["anchors"][2] == [2.0, 1.0]


def test_the_guard_refuses_a_prototype_long_enough_to_be_features():
    strategy = _strategy("cfa")
    replies = [_reply(1, UPDATES[1], prototype=[0.1] * 5000), _reply(2, UPDATES[2],
                                                                     prototype=[0.1, 0.2])]
    _train_round(strategy, 1, np.zeros(4), replies)
    refused = [row for row in strategy.audit.rows if not row["accepted"]]
    assert [row["node"] for row in refused] == [1] and "5000 values" in refused[0]["reason"]


def _eq7(queries, positives, negatives, tau, exclude_self=False):
    cos = torch.nn.functional.cosine_similarity
    terms = []
    for i, f_i in enumerate(queries):
        denominator = sum(math.exp(cos(f_i, f_k, dim=0).item() / tau) for f_k in negatives)
        for j, f_j in enumerate(positives):
            if exclude_self and i == j:
                continue
            terms.append(-math.log(math.exp(cos(f_i, f_j, dim=0).item() / tau) / denominator))
    return sum(terms) / len(terms)


def test_info_nce_equals_eq_7_computed_directly():
    g = torch.Generator().manual_seed(0)
    q, p, k = (torch.randn(n, 5, generator=g) for n in (3, 4, 6))
    assert info_nce(q, p, k, 0.2).item() == pytest.approx(_eq7(q, p, k, 0.2), rel=1e-5)
    assert info_nce(q, q, k, 0.5, exclude_self=True).item() == pytest.approx(
        _eq7(q, q, k, 0.5, exclude_self=True), rel=1e-5)
    assert info_nce(q, p, k[:0], 0.2).item() == 0.0


def test_cfa_optimisation_pulls_normal_embeddings_together():
    g = torch.Generator().manual_seed(1)
    normals = torch.randn(8, 16, generator=g, requires_grad=True)
    anomalous = torch.randn(8, 16, generator=g, requires_grad=True)
    anchors = torch.randn(2, 16, generator=g)
    labels = torch.tensor([0] * 8 + [1] * 8)
    loss_fn = alignment_loss(anchors, tau=0.1, weight=1.0)
    optimizer = torch.optim.SGD([normals, anomalous], lr=0.2)

    def spread():
        unit = torch.nn.functional.normalize(normals.detach(), dim=1)
        return 1 - (unit @ unit.T)[~torch.eye(8, dtype=torch.bool)].mean().item()

    before = spread()
    for _ in range(300):
        output = type("Output", (), {"embedding": torch.cat([normals, anomalous])})
        loss = loss_fn(output, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert spread() < 0.5 * before
    proto = normal_prototype(normals.detach())
    assert proto.shape == (16,) and proto.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_client_evaluation_is_averaged_by_sample_count_under_aca():
    strategy = _strategy("fedmsvt")
    replies = []
    for node, (count, accuracy) in {1: (10, 0.5), 2: (30, 0.9)}.items():
        out = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        metrics = MetricRecord({"num-examples": count, "val_pixel_accuracy": accuracy})
        replies.append(Message(RecordDict({"metrics": metrics}), reply_to=out))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["val_pixel_accuracy"] == pytest.approx(0.8)
