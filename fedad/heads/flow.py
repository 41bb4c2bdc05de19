"""A normalizing flow on normal patch features; a patch's score is its negative
log-likelihood under the flow (the NF density head of the ViT + GMM / NF seed, on patches).

The flow standardises features with fixed statistics, then applies affine coupling blocks
(RealNVP, with a soft clamp on the log-scales as in FastFlow / FrEIA's GLOW coupling) and a
fixed seeded permutation between blocks, onto a standard normal. Federated: round 1 computes
the pooled feature mean and variance from the sites' moments; every round the sites train the
global flow locally and the server averages the weights, weighted by patch counts (FedAvg).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from fedad.heads.base import FeatureHead
from fedad.heads.payload import Payload
from fedad.train.loop import train_loop

SCALE_CLAMP = 2.0
BATCH_SIZE = 256


class AffineCoupling(nn.Module):
    """x = [a, b] -> [a, b * exp(s(a)) + t(a)] with s soft-clamped to (-c, c)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.split = dim // 2
        self.net = nn.Sequential(nn.Linear(self.split, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * (dim - self.split)))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (y [N, D], log|det dy/dx| [N])."""
        a, b = x[:, : self.split], x[:, self.split:]
        log_scale, shift = self.net(a).chunk(2, dim=1)
        log_scale = SCALE_CLAMP * torch.tanh(log_scale / SCALE_CLAMP)
        return torch.cat([a, b * torch.exp(log_scale) + shift], dim=1), log_scale.sum(1)


class PatchFlow(nn.Module):
    """Standardisation, ``blocks`` couplings with fixed permutations, standard normal base."""

    def __init__(self, dim: int, blocks: int, hidden: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        for i in range(blocks):
            self.register_buffer(f"perm{i}", torch.randperm(dim, generator=generator), False)
        self.couplings = nn.ModuleList(AffineCoupling(dim, hidden) for _ in range(blocks))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) [N] of features x [N, D]."""
        z = (x - self.mean) / self.std
        log_det = -torch.log(self.std).sum()  # [], broadcast to [N] by the couplings
        for i, coupling in enumerate(self.couplings):
            z, block_log_det = coupling(z[:, getattr(self, f"perm{i}")])
            log_det = log_det + block_log_det
        return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + log_det


class FlowHead(FeatureHead):
    """A :class:`PatchFlow`; payloads carry its state dict (kind ``flow``)."""

    fit_kind = "flow"
    refine_kind = "flow"

    @property
    def num_units(self) -> int:
        return self.settings.flow_blocks

    def new_flow(self) -> PatchFlow:
        """A freshly initialised flow (seeded)."""
        torch.manual_seed(self.seed)
        return PatchFlow(self.dim, self.settings.flow_blocks, self.settings.flow_hidden,
                         self.seed)

    def reference_shapes(self, kind: str) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes of the flow's state dict (``flow`` payloads; other kinds have
        templates)."""
        if kind != "flow":
            return None
        return {k: tuple(v.shape) for k, v in self.new_flow().state_dict().items()}

    def fit_local(self, features: torch.Tensor) -> Payload:
        """Site: standardise with the local moments and train a fresh flow."""
        features = self.rows(features)
        flow = self.new_flow().to(self.device)
        flow.mean.copy_(features.mean(0))
        flow.std.copy_(features.std(0).clamp_min(1e-3))
        return self._train(flow, features)

    def merge(self, payloads: list[Payload]) -> Payload:
        """Server: FedAvg of the flows, weighted by patch counts; the standardisation is the
        pooled mean and standard deviation (exact, from the sites' means and variances)."""
        state = _weighted_average(payloads)
        counts = np.array([p.count for p in payloads], np.float64)
        means = np.stack([p.arrays["mean"] for p in payloads]).astype(np.float64)
        second = np.stack([p.arrays["std"] ** 2 + p.arrays["mean"] ** 2 for p in payloads])
        mean = counts @ means / counts.sum()
        state["mean"] = mean.astype(np.float32)
        state["std"] = np.sqrt(np.maximum(counts @ second / counts.sum() - mean**2, 1e-6)
                               ).astype(np.float32)
        return Payload(self.fit_kind, state, int(counts.sum()))

    def refine_local(self, head: Payload, features: torch.Tensor) -> Payload:
        """Site: train the global flow further on local features (standardisation fixed)."""
        flow = self.load_flow(head)
        return self._train(flow, self.rows(features))

    def refine(self, head: Payload, payloads: list[Payload]) -> Payload:
        """Server: FedAvg of the sites' flows, weighted by patch counts."""
        state = _weighted_average(payloads)
        state["mean"], state["std"] = head.arrays["mean"], head.arrays["std"]
        return Payload(self.fit_kind, state, sum(p.count for p in payloads))

    def patch_scores(self, head: Payload, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [N] of patch features [N, D] under the flow."""
        flow = self.load_flow(head).eval()
        with torch.no_grad():
            return -flow.log_prob(self.rows(features))

    def load_flow(self, head: Payload) -> PatchFlow:
        """The flow of ``head`` on the head's device."""
        flow = self.new_flow()
        flow.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in head.arrays.items()})
        return flow.to(self.device)

    def _train(self, flow: PatchFlow, features: torch.Tensor) -> Payload:
        """``flow-epochs`` epochs of maximum likelihood (Adam, no gradient clipping), seeded
        shuffling, through the one training loop."""
        optimiser = torch.optim.Adam(flow.couplings.parameters(), lr=self.settings.flow_lr)
        generator = torch.Generator().manual_seed(self.seed)
        flow.train()
        epochs = (torch.randperm(len(features), generator=generator).split(BATCH_SIZE)
                  for _ in range(self.settings.flow_epochs))

        def step(batch: torch.Tensor):
            return None, None, {"loss": -flow.log_prob(features[batch]).mean() / self.dim}

        try:
            train_loop(step, epochs, optimiser, list(flow.couplings.parameters()),
                       clip_norm=None, name="flow training")
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}: the flow diverged; lower flow-lr") from None
        state = OrderedDict((k, v.detach().cpu().numpy().copy())
                            for k, v in flow.state_dict().items())
        return Payload(self.fit_kind, state, len(features))


def _weighted_average(payloads: list[Payload]) -> dict[str, np.ndarray]:
    """Count-weighted average of the payloads' arrays (float keys only)."""
    counts = np.array([p.count for p in payloads], np.float64)
    share = counts / counts.sum()
    return {key: np.tensordot(share, np.stack([p.arrays[key] for p in payloads]), axes=1
                              ).astype(np.float32)
            for key in payloads[0].arrays}
