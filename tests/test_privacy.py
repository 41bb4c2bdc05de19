"""Differential privacy: the wrapped strategy clips and noises replies as configured, the
client clipping mod is a no-op unless asked for, and epsilon matches the Gaussian mechanism."""

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from scipy.optimize import brentq
from scipy.stats import norm

from fedad.config import ConfigError, ExperimentConfig
from fedad.privacy import DPSettings, client_clipping_mod, privacy_epsilon, wrap_with_privacy
from strategies import build_strategy

SIZE = 20_000


pytestmark = pytest.mark.usefixtures("task_identity")


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def _arrays(value: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(value.astype(np.float32))})


def _reply(node: int, value: np.ndarray) -> Message:
    out = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": _arrays(value),
                          "metrics": MetricRecord({"num-examples": 10})})
    return Message(content, reply_to=out)


def _wrapped(**keys):
    cfg = ExperimentConfig(min_train_nodes=2, num_server_rounds=3, extra=keys)
    strategy = wrap_with_privacy(FedAvg(min_train_nodes=2, min_available_nodes=2), cfg)
    messages = list(strategy.configure_train(1, _arrays(np.zeros(SIZE)), ConfigRecord(), _Grid()))
    return strategy, messages


def test_dp_none_leaves_the_strategy_alone():
    strategy = FedAvg()
    assert wrap_with_privacy(strategy, ExperimentConfig()) is strategy


def test_server_fixed_clipping_bounds_each_update_then_averages():
    strategy, _ = _wrapped(**{"dp": "server-fixed", "dp-noise-multiplier": 0.0,
                              "dp-clipping-norm": 2.0})
    big = np.zeros(SIZE)
    big[0] = 100.0  # norm 100, clipped to 2
    small = np.zeros(SIZE)
    small[1] = 1.0  # norm 1, under the bound: unchanged
    arrays, _ = strategy.aggregate_train(1, [_reply(1, big), _reply(2, small)])
    result = arrays["w"].numpy()
    np.testing.assert_allclose(result[:2], [1.0, 0.5], rtol=1e-6)
    assert np.count_nonzero(result) == 2


def test_server_fixed_noise_has_the_configured_standard_deviation():
    z, clip, sampled = 1.5, 0.5, 2
    strategy, _ = _wrapped(**{"dp": "server-fixed", "dp-noise-multiplier": z,
                              "dp-clipping-norm": clip})
    np.random.seed(0)  # Flower draws the noise from NumPy's global generator
    update = np.full(SIZE, 1e-4)  # norm 0.014, under the clipping norm
    arrays, _ = strategy.aggregate_train(1, [_reply(1, update), _reply(2, update)])
    noise = arrays["w"].numpy() - update
    assert abs(noise.mean()) < 0.05 * z * clip / sampled
    assert noise.std() == pytest.approx(z * clip / sampled, rel=0.03)


def test_client_side_dp_sends_the_norm_and_the_mod_clips_only_when_asked():
    strategy, messages = _wrapped(**{"dp": "client-fixed", "dp-noise-multiplier": 0.0,
                                     "dp-clipping-norm": 1.0})
    assert strategy.clipping_norm == 1.0
    msg = messages[0]
    assert msg.content["config"]["clipping_norm"] == 1.0  # Flower's KEY_CLIPPING_NORM

    def site(message, context):  # a site that moves the model by norm 10
        update = np.zeros(SIZE)
        update[0] = 10.0
        return Message(RecordDict({"arrays": _arrays(update),
                                   "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=message)

    def context(run_config):
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                       run_config=run_config)

    clipped = client_clipping_mod(msg, context({"dp": "client-fixed"}), site)
    assert np.linalg.norm(clipped.content["arrays"]["w"].numpy()) == pytest.approx(1.0)
    untouched = client_clipping_mod(msg, context({"dp": "none"}), site)
    assert np.linalg.norm(untouched.content["arrays"]["w"].numpy()) == pytest.approx(10.0)
    evaluate = Message(RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    passed = client_clipping_mod(evaluate, context({"dp": "client-fixed"}),
                                 lambda m, c: Message(RecordDict(), reply_to=m))
    assert not passed.has_error()


@pytest.mark.parametrize("dp", ["server-adaptive", "client-adaptive"])
def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile(dp):
    strategy, _ = _wrapped(**{"dp": dp, "dp-noise-multiplier": 0.0,
                              "dp-clipping-norm": 1.0, "dp-target-quantile": 0.5,
                              "dp-clip-norm-lr": 0.2})
    strategy._geometric_update(clipped_fraction=1.0)  # every update clipped: the norm grows
    assert strategy.clipping_norm == pytest.approx(math.exp(0.1))
    strategy._geometric_update(clipped_fraction=0.0)  # none clipped: it shrinks back
    assert strategy.clipping_norm == pytest.approx(1.0)


def test_server_adaptive_norm_grows_while_updates_are_above_it():
    strategy, _ = _wrapped(**{"dp": "server-adaptive", "dp-noise-multiplier": 0.0,
                              "dp-clipping-norm": 0.1})
    update = np.zeros(SIZE)
    update[0] = 5.0
    for server_round in (1, 2, 3):
        before = strategy.clipping_norm
        list(strategy.configure_train(server_round, _arrays(np.zeros(SIZE)), ConfigRecord(),
                                      _Grid()))
        strategy.aggregate_train(server_round, [_reply(1, update), _reply(2, update)])
        assert strategy.clipping_norm > before


def _exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Exact epsilon of ``rounds`` Gaussian releases (mu-GDP with mu = sqrt(rounds) / z)."""
    mu = math.sqrt(rounds) / z

    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda eps: delta_of(eps) - delta, 0.0, 500.0)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 4), (2.0, 10), (0.8, 20)])
def test_rdp_epsilon_is_a_tight_upper_bound_of_the_exact_gaussian_epsilon(z, rounds):
    eps = privacy_epsilon(z, rounds, 1e-5)
    exact = _exact_gaussian_epsilon(z, rounds, 1e-5)
    assert exact <= eps <= 1.3 * exact
    assert privacy_epsilon(z, rounds + 1, 1e-5) > eps > privacy_epsilon(2 * z, rounds, 1e-5)
    assert privacy_epsilon(0.0, rounds, 1e-5) == math.inf


@pytest.mark.parametrize(("key", "value"), [("dp", "local"), ("dp-clipping-norm", 0.0),
                                            ("dp-delta", 1.0), ("dp-noise-multiplier", -1)])
def test_bad_dp_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        ExperimentConfig(extra={key: value}).section(DPSettings)


def test_registry_wraps_every_strategy_when_dp_is_on():
    from strategies.statistics import strategy_chain

    for name in ("fedavg", "krum", "aca"):
        cfg = ExperimentConfig(strategy=name, extra={"dp": "server-fixed"})
        chain = [type(s).__name__ for s in strategy_chain(build_strategy(cfg))]
        assert chain[:2] == ["GuardedStrategy", "DifferentialPrivacyServerSideFixedClipping"]
        assert len(chain) >= 3  # the wrapped strategy stays reachable (checkpoints, ACA log)


def test_adaptive_clipping_with_too_few_clients_for_the_noise_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dp-noise-multiplier=1\.0 with 2 sampled clients"):
        _wrapped(**{"dp": "server-adaptive", "dp-noise-multiplier": 1.0})


def test_adapted_clipping_norm_is_checkpointed_and_restored():
    keys = {"dp": "server-adaptive", "dp-noise-multiplier": 0.0, "dp-clipping-norm": 1.0}
    cfg = ExperimentConfig(min_train_nodes=2, num_server_rounds=3, extra=keys)
    running = build_strategy(cfg)
    dp_wrapper = running.inner
    dp_wrapper._geometric_update(clipped_fraction=1.0)
    state = running.state_dict()
    assert state[type(dp_wrapper).__name__]["clipping_norm"] == pytest.approx(math.exp(0.1))
    restored = build_strategy(cfg)
    restored.load_state_dict(state)
    assert restored.inner.clipping_norm == pytest.approx(math.exp(0.1))
