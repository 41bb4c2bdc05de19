"""Differential privacy for federated training: Flower's central-DP strategy wrappers chosen by
run-config, the matching client-side clipping mod, and the (epsilon, delta) they amount to.

``dp`` picks the mechanism (Flower 1.41, ``flwr.serverapp.strategy``):

- ``server-fixed`` / ``server-adaptive``: the server clips every site's update (to
  ``dp-clipping-norm``, or to a norm adapted towards the ``dp-target-quantile`` of update
  norms, Andrew et al. 2021) and adds Gaussian noise to the aggregate;
- ``client-fixed`` / ``client-adaptive``: the sites clip (:func:`client_clipping_mod` on the
  ClientApp runs Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``), the server adds
  the noise.

The noise on the average of m updates has standard deviation ``noise_multiplier * clip / m``
(client-level DP). ``m`` is ``dp-num-sampled-clients``, by default ``min-train-nodes``: a round
aggregates at least that many replies, so the noise is never smaller than the guarantee
needs. The privacy cost is accounted with Google's ``dp-accounting`` RDP accountant as
``num-server-rounds`` compositions of the Gaussian mechanism with that noise multiplier and
no sampling amplification (every site trains every round).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedad.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

MECHANISMS = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


@dataclass(frozen=True)
class DPSettings:
    """Run-config section of differential privacy (keys ``dp``, ``dp-*``; see the module
    docstring). With adaptive clipping the norm tracks the ``dp-target-quantile`` of the update
    norms, so 0.5 clips about half of the updates."""

    dp: str = "none"
    """Differential privacy: none, server-fixed, server-adaptive, client-fixed, client-adaptive."""
    dp_noise_multiplier: float = 1.0
    """Noise standard deviation over the clipping norm."""
    dp_clipping_norm: float = 1.0
    """The fixed clipping norm, or the initial one of adaptive clipping."""
    dp_target_quantile: float = 0.5
    """Adaptive clipping: the quantile of update norms the norm tracks."""
    dp_clip_norm_lr: float = 0.2
    """Adaptive clipping: learning rate of the norm's geometric update."""
    dp_num_sampled_clients: int = 0
    """Sites per round the noise is calibrated for (0: min-train-nodes)."""
    dp_delta: float = 1e-5
    """The delta at which epsilon is reported."""

    def __post_init__(self) -> None:
        if self.dp not in MECHANISMS:
            raise ValueError(f"dp={self.dp!r}: expected one of {', '.join(MECHANISMS)}")
        if not self.dp_noise_multiplier >= 0:
            raise ValueError(f"dp-noise-multiplier={self.dp_noise_multiplier}: must be >= 0")
        if not self.dp_clipping_norm > 0:
            raise ValueError(f"dp-clipping-norm={self.dp_clipping_norm}: must be > 0")
        if not 0.0 <= self.dp_target_quantile <= 1.0:
            raise ValueError(f"dp-target-quantile={self.dp_target_quantile}: must be in [0, 1]")
        if not self.dp_clip_norm_lr > 0:
            raise ValueError(f"dp-clip-norm-lr={self.dp_clip_norm_lr}: must be > 0")
        if self.dp_num_sampled_clients < 0:
            raise ValueError(
                f"dp-num-sampled-clients={self.dp_num_sampled_clients}: must be >= 0")
        if not 0.0 < self.dp_delta < 1.0:
            raise ValueError(f"dp-delta={self.dp_delta}: must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        """True unless ``dp=none``."""
        return self.dp != "none"

    @property
    def clips_on_client(self) -> bool:
        """True when the sites clip their own updates (``client-*``)."""
        return self.dp.startswith("client-")


class _QuantileTracking:
    """Adaptive clipping that moves the norm towards the ``dp-target-quantile`` of update norms
    (Andrew et al. 2021: C <- C exp(-lr (unclipped fraction - quantile))).

    Flower 1.41 counts the *clipped* updates but applies that rule as if they were the
    unclipped ones, so its norm shrinks when too many updates are clipped and runs off to 0
    or infinity; this mixin applies the rule to the unclipped fraction.
    """

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(
            -self.clip_norm_lr * (unclipped - self.target_clipped_quantile))


class ServerSideAdaptiveClipping(_QuantileTracking, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the norm update of :class:`_QuantileTracking`."""


class ClientSideAdaptiveClipping(_QuantileTracking, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the norm update of :class:`_QuantileTracking`."""


def privacy_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian releases with ``noise_multiplier`` (noise std over the
    sensitivity) at ``delta``, by the RDP accountant of ``dp-accounting``; inf without noise."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be >= 1")
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def wrap_with_privacy(strategy: Strategy, cfg: ExperimentConfig) -> Strategy:
    """``strategy`` inside the DP wrapper named by ``dp`` (unchanged for ``dp=none``).

    Logs the mechanism, noise multiplier, clipping norm and the (epsilon, delta) of
    ``num-server-rounds`` rounds.
    """
    settings = cfg.section(DPSettings)
    if not settings.enabled:
        return strategy
    sampled = settings.dp_num_sampled_clients or cfg.min_train_nodes
    noise = settings.dp_noise_multiplier
    if settings.dp.endswith("-fixed"):
        wrapper = (DifferentialPrivacyClientSideFixedClipping if settings.clips_on_client
                   else DifferentialPrivacyServerSideFixedClipping)
        wrapped = wrapper(strategy, noise_multiplier=noise,
                          clipping_norm=settings.dp_clipping_norm, num_sampled_clients=sampled)
    else:
        wrapper = (ClientSideAdaptiveClipping if settings.clips_on_client
                   else ServerSideAdaptiveClipping)
        try:
            wrapped = wrapper(strategy, noise_multiplier=noise, num_sampled_clients=sampled,
                              initial_clipping_norm=settings.dp_clipping_norm,
                              target_clipped_quantile=settings.dp_target_quantile,
                              clip_norm_lr=settings.dp_clip_norm_lr)
        except ValueError as err:  # Flower: count noise m/20 must exceed noise-multiplier / 2
            raise ConfigError(f"dp={settings.dp} dp-noise-multiplier={noise} with {sampled} "
                              f"sampled clients: {err}") from err
    wrapped.inner = strategy  # strategy_chain (checkpoint state, ACA weights) walks `.inner`
    epsilon = privacy_epsilon(noise, cfg.num_server_rounds, settings.dp_delta)
    log.info("privacy: dp=%s noise-multiplier=%g clipping-norm=%g (%s) over %d sampled "
             "clients: (epsilon=%.3g, delta=%g) after %d rounds", settings.dp, noise,
             settings.dp_clipping_norm, "fixed" if settings.dp.endswith("-fixed") else "initial",
             sampled, epsilon, settings.dp_delta, cfg.num_server_rounds)
    return wrapped


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: a training message under ``dp=client-fixed`` / ``client-adaptive`` goes
    through Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (the update is clipped to
    the norm the server sent); every other message passes unchanged."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    dp_keys = {k: v for k, v in context.run_config.items() if k.startswith("dp")}
    settings = ExperimentConfig.from_run_config(dp_keys).section(DPSettings)
    if not settings.clips_on_client:
        return call_next(msg, context)
    mod = fixedclipping_mod if settings.dp == "client-fixed" else adaptiveclipping_mod
    return mod(msg, context, call_next)


CLIENT_MODS = (client_clipping_mod,)
"""The mods every site applies, in order: the ClientApp's ``mods`` and those of
:class:`fedad.inprocess.InProcessGrid`."""
