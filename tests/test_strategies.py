"""The strategy registry and the reply guard in front of every strategy."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedad.config import ConfigError, ExperimentConfig
from strategies import build_strategy, list_strategies

pytestmark = pytest.mark.usefixtures("task_identity")


def _reply(node: int, arrays: list[np.ndarray], metrics: dict) -> Message:
    out = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    record = ArrayRecord(arrays)
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=out)


class _Grid:
    """Just enough of a Grid for configure_train: seven connected nodes."""

    def get_node_ids(self):
        return list(range(1, 8))


def _configured(name: str, arrays: list[np.ndarray]):
    """A registry strategy after configure_train sent ``arrays`` as the global model."""
    strategy = build_strategy(ExperimentConfig(strategy=name))
    list(strategy.configure_train(1, ArrayRecord(arrays), ConfigRecord(), _Grid()))
    return strategy


@pytest.mark.parametrize("name", list_strategies())
def test_every_strategy_excludes_nonfinite_and_misshaped_updates(name):
    strategy = _configured(name, [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
    good = [_reply(n, [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)],
                   {"num-examples": 10, "train_loss": 0.5, "val_pixel_ap": 0.9,
                    "partition": n, "prototype": [1.0, 0.0]})
            for n, v in ((1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0))]
    nan = _reply(5, [np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)],
                 {"num-examples": 10, "train_loss": 0.5})
    inf_metric = _reply(6, [np.ones((2, 3), np.float32), np.ones(4, np.float32)],
                        {"num-examples": 10, "train_loss": float("inf")})
    shape = _reply(7, [np.ones((3, 2), np.float32), np.ones(4, np.float32)],
                   {"num-examples": 10, "train_loss": 0.5})
    arrays, _ = strategy.aggregate_train(1, [*good, nan, inf_metric, shape])
    assert arrays is not None
    for value in arrays.to_numpy_ndarrays():
        assert np.isfinite(value).all()
    refused = {row["node"]: row["reason"] for row in strategy.audit.rows if not row["accepted"]}
    assert set(refused) == {5, 6, 7}
    assert "non-finite" in refused[5] and "train_loss" in refused[6] and "shape" in refused[7]
    if name in ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "fedprox"):
        np.testing.assert_allclose(arrays["0"].numpy(), 1.0)


def test_fedavg_weights_by_num_examples_after_the_guard():
    strategy = _configured("fedavg", [np.zeros(2, np.float32)])
    replies = [_reply(1, [np.array([1.0, 1.0], np.float32)], {"num-examples": 30}),
               _reply(2, [np.array([5.0, 5.0], np.float32)], {"num-examples": 10})]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["0"].numpy(), [2.0, 2.0])
    accepted = [row for row in strategy.audit.rows if row["accepted"]]
    assert len(accepted) == 2 and all(len(row["digest"]) == 16 for row in accepted)


def test_all_replies_refused_keeps_the_global_model():
    strategy = _configured("fedavg", [np.zeros(2, np.float32)])
    bad = _reply(1, [np.array([np.inf, 0], np.float32)], {"num-examples": 3})
    arrays, _ = strategy.aggregate_train(1, [bad])
    assert arrays is None  # Strategy.start keeps the previous global arrays


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy='nope'"):
        build_strategy(ExperimentConfig(strategy="nope"))


def test_aggregate_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=(64,)).astype(np.float32) * 10.0 ** rng.integers(-3, 4)
               for _ in range(5)]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        strategy = _configured("fedavg", [np.zeros(64, np.float32)])
        replies = [_reply(i + 1, [updates[i]], {"num-examples": 3 + i}) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(arrays["0"].numpy())
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizer_state_survives_a_checkpoint(name):
    """A strategy restored from state_dict() (through torch.save/load as checkpoints are)
    aggregates the next round exactly like the one that kept running."""
    def round_replies(value: float) -> list[Message]:
        return [_reply(n, [np.full(3, value * n, np.float32)], {"num-examples": 10})
                for n in (1, 2)]

    running = _configured(name, [np.zeros(3, np.float32)])
    arrays, _ = running.aggregate_train(1, round_replies(1.0))
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state, "no server-optimizer state was checkpointed"

    restored = build_strategy(ExperimentConfig(strategy=name))
    restored.load_state_dict(state)
    fresh = build_strategy(ExperimentConfig(strategy=name))
    results = []
    for strategy in (running, restored, fresh):
        list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid()))
        results.append(strategy.aggregate_train(2, round_replies(2.0))[0]["0"].numpy())
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.allclose(results[0], results[2])  # the moments matter: a restart differs


def test_optimizer_state_of_another_strategy_is_refused():
    strategy = build_strategy(ExperimentConfig(strategy="fedavgm"))
    with pytest.raises(ValueError, match="m_t"):
        strategy.load_state_dict({type(strategy.inner).__name__: {"m_t": {}}})
