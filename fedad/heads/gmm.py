"""A Gaussian mixture over normal patch features; a patch's score is its negative
log-likelihood (the density head of the ViT + GMM seed, on patches).

Sites fit a K-component mixture with scikit-learn's EM. The server merges the sites'
components (weights scaled by each site's patch count) into K components by moment matching:
components are grouped by weighted k-means on their means and each group is replaced by the
Gaussian with the group's total weight, mean and covariance (law of total covariance).
Refinement rounds are federated EM: sites run the E-step against the global mixture and send
the sufficient statistics (sum of responsibilities, of r x, of r x x^T) per component; the
server's M-step on the pooled statistics is the exact centralized EM step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from fedad.heads.base import FeatureHead, check_features
from fedad.heads.clustering import kmeans
from fedad.heads.payload import Payload

REG_COVAR = 1e-3
"""Added to every covariance diagonal (scikit-learn's reg_covar), in squared feature units."""


class GaussianMixtureHead(FeatureHead):
    """K Gaussians: weights [K], means [K, D], covariances [K, D, D] (diagonal when
    ``gmm-covariance=diag``, stored as diagonal matrices)."""

    fit_kind = "mixture"
    refine_kind = "em-stats"

    @property
    def num_units(self) -> int:
        return self.settings.gmm_components

    def fit_local(self, features: torch.Tensor) -> Payload:
        """Site: EM on patch features [N, D] (scikit-learn, seeded; on the CPU whatever the
        head's device)."""
        features = check_features(features, self.dim).double().cpu().numpy()
        model = GaussianMixture(self.num_units, covariance_type=self.settings.gmm_covariance,
                                reg_covar=REG_COVAR, max_iter=100, random_state=self.seed)
        model.fit(features)
        covariances = model.covariances_
        if self.settings.gmm_covariance == "diag":
            covariances = np.stack([np.diag(c) for c in covariances])
        return _mixture(model.weights_, model.means_, covariances, len(features))

    def merge(self, payloads: list[Payload]) -> Payload:
        """Server: moment-matched reduction of the count-weighted union of components."""
        weights = np.concatenate([p.arrays["weights"] * p.count for p in payloads])
        means = np.concatenate([p.arrays["means"] for p in payloads]).astype(np.float64)
        covs = np.concatenate([p.arrays["covariances"] for p in payloads]).astype(np.float64)
        centres = kmeans(torch.from_numpy(means).float(), self.num_units,
                         weights=torch.from_numpy(weights).float(), seed=self.seed)
        groups = torch.cdist(torch.from_numpy(means), centres.double()).argmin(1).numpy()
        merged = [_moment_match(weights[groups == g], means[groups == g], covs[groups == g])
                  for g in range(self.num_units) if (groups == g).any()]
        if len(merged) < self.num_units:
            raise ValueError(f"gmm-components={self.num_units}: the sites' components form "
                             f"only {len(merged)} distinct groups")
        w, mu, cov = (np.stack(x) for x in zip(*merged, strict=True))
        return _mixture(w / w.sum(), mu, self._restrict(cov), sum(p.count for p in payloads))

    def refine_local(self, head: Payload, features: torch.Tensor) -> Payload:
        """Site: E-step sufficient statistics under the global mixture."""
        x = self.rows(features).double()
        resp = torch.softmax(MixtureDensity(head).to(x.device).log_densities(x), dim=0).T
        stats = {"counts": resp.sum(0), "sums": resp.T @ x,
                 "outer": torch.einsum("nk,nd,ne->kde", resp, x, x)}
        return Payload(self.refine_kind, {k: v.cpu().numpy() for k, v in stats.items()},
                       len(x))

    def refine(self, head: Payload, payloads: list[Payload]) -> Payload:
        """Server: M-step on the pooled statistics (the centralized EM step)."""
        counts = np.sum([p.arrays["counts"] for p in payloads], axis=0).astype(np.float64)
        sums = np.sum([p.arrays["sums"] for p in payloads], axis=0).astype(np.float64)
        outer = np.sum([p.arrays["outer"] for p in payloads], axis=0).astype(np.float64)
        safe = np.maximum(counts, 1e-10)
        means = sums / safe[:, None]
        covs = outer / safe[:, None, None] - np.einsum("kd,ke->kde", means, means)
        covs = self._restrict(covs)
        return _mixture(np.maximum(counts, 1e-10) / safe.sum(), means, covs,
                        sum(p.count for p in payloads))

    def patch_scores(self, head: Payload, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [N] of patch features [N, D] under the mixture."""
        x = self.rows(features)
        return MixtureDensity(head).to(x.device)(x)

    def _restrict(self, covs: np.ndarray) -> np.ndarray:
        """Covariances [K, D, D] made symmetric, diagonal if configured, regularised."""
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        if self.settings.gmm_covariance == "diag":
            covs = np.stack([np.diag(np.diag(c)) for c in covs])
        return covs + REG_COVAR * np.eye(self.dim)[None]


def _moment_match(weights: np.ndarray, means: np.ndarray, covs: np.ndarray
                  ) -> tuple[float, np.ndarray, np.ndarray]:
    """The single Gaussian with the mixture's weight, mean and covariance:
    weights [G], means [G, D], covs [G, D, D] -> (weight, mean [D], cov [D, D])."""
    total = weights.sum()
    mean = weights @ means / total
    centred = means - mean
    cov = (np.einsum("g,gde->de", weights, covs)
           + np.einsum("g,gd,ge->de", weights, centred, centred)) / total
    return float(total), mean, cov


class MixtureDensity(nn.Module):
    """Patch features x [N, D] -> -log sum_k w_k N(x | mu_k, Sigma_k) [N] of a ``mixture``
    payload, in float64 with the inverse Cholesky factors precomputed: the one form that the
    head, its E-step and the exported scorer share (ONNX has no triangular solve)."""

    def __init__(self, head: Payload) -> None:
        super().__init__()
        arrays = {k: torch.from_numpy(np.asarray(v)).double() for k, v in head.arrays.items()}
        chol = torch.linalg.cholesky(arrays["covariances"])  # [K, D, D]
        eye = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        self.register_buffer("means", arrays["means"], False)  # [K, D]
        self.register_buffer("roots", torch.linalg.solve_triangular(chol, eye, upper=False).mT,
                             False)  # L^-T [K, D, D]
        self.register_buffer("offsets", torch.log(arrays["weights"]) - 0.5 * (
            log_det + chol.shape[-1] * math.log(2 * math.pi)), False)  # [K]

    def log_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log (w_k N(x | mu_k, Sigma_k)) [K, N] of x [N, D] (float64)."""
        z = (x.double()[None] - self.means[:, None]) @ self.roots  # [K, N, D]
        return self.offsets[:, None] - 0.5 * z.pow(2).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [N] (float32) of x [N, D]."""
        log_densities = self.log_densities(x)
        # log-sum-exp spelt out: OpenVINO's ONNX ReduceLogSumExp loses the tensor's rank
        top = log_densities.amax(0)
        return -(top + (log_densities - top).exp().sum(0).log()).float()


def _mixture(weights: np.ndarray, means: np.ndarray, covs: np.ndarray, count: int) -> Payload:
    return Payload("mixture", {"weights": np.asarray(weights, np.float64),
                               "means": np.asarray(means, np.float64),
                               "covariances": np.asarray(covs, np.float64)}, count)
