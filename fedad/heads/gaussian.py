"""PaDiM's Gaussians of normal patch features (``method=padim``): a patch's score is its
Mahalanobis distance to the Gaussian of its position (the seed's density head on frozen
features, with PaDiM's per-position Gaussians).

Positions: with ``gaussian-positions=per-position`` the h x w feature map is cut into a
``gaussian-grid`` x ``gaussian-grid`` grid of cells and the patches of one cell, over all
images, share a Gaussian (K = G^2; G = h = w is PaDiM's one Gaussian per position); with
``shared`` one Gaussian holds every patch (K = 1). Channels: PaDiM's random dimension
reduction, ``gaussian-channels`` (C) of the D channels drawn from the run's seed, the same on
every site and the server. Covariance: the unbiased sample covariance plus EPS * I.

Federated exactly, in one round: each site sends, per Gaussian, its patch count, sum [C] and
outer-product sum [C, C] in float64 (a ``gaussian-stats`` payload); the server adds them. The
global head *is* the pooled statistics, from which sites and server form the same means and
covariances, so it equals the centralized fit on the pooled patches. Later rounds re-send the
same statistics and would rebuild the same head, so the workflow runs one round whatever
num-server-rounds says.
Payload per site: K (1 + C + C^2) float64 values, 20.7 MB at the defaults (K = 16^2,
C = 100), 81 KB shared; one Gaussian per position of the default 112 x 112 map (224 px,
feature-scales 2) would be 1 GB.

The global whitening and the map baseline are kept. The whitening is one affine map on every
site and the server, which leaves a full-covariance Mahalanobis distance as it is but for the
channel draw and EPS (it is not needed; ``feature-whitening=false`` saves its round). The
baseline removes the border excess of the normal maps: near zero with per-position Gaussians,
which model the border, the same correction as for the other heads with a shared one.
"""

from __future__ import annotations

import numpy as np
import torch

from fedad.device import CPU
from fedad.heads.base import FeatureHead
from fedad.heads.payload import Payload
from fedad.heads.scoring import PatchSet
from fedad.heads.settings import HeadSettings

EPS = 0.01
"""Added to every covariance diagonal (PaDiM's 0.01), in squared feature units."""


class GaussianHead(FeatureHead):
    """K Gaussians of C seeded channels, as pooled statistics: counts [K], sums [K, C],
    outer-product sums [K, C, C]. Features are whole images' patch rows [n * h * w, D] in
    (image, y, x) order, as :meth:`fit_rows` and :func:`fedad.heads.scoring.anomaly_maps`
    give them."""

    fit_kind = "gaussian-stats"
    refine_kind = "gaussian-stats"
    refines = False  # exact in one round: later rounds would rebuild the same head

    def __init__(self, settings: HeadSettings, dim: int, seed: int = 0,
                 grid: tuple[int, int] | None = None,
                 device: torch.device = CPU) -> None:
        super().__init__(settings, dim, seed, grid, device)
        if grid is None:
            raise ValueError("method=padim: the head needs the feature maps' grid (h, w)")
        draw = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.channels = draw[:settings.gaussian_channels].sort().values.to(self.device)
        self.cells = [cell.to(self.device) for cell in cells(grid, settings)]
        self.cell_order = torch.argsort(torch.cat(self.cells))  # cells' columns -> positions
        self._scorer: tuple[Payload, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_units(self) -> int:
        return len(self.cells)

    @property
    def sizes(self) -> dict[str, int]:
        """Template symbols: ``K`` Gaussians, ``C`` kept channels, ``D`` feature width."""
        return {**super().sizes, "C": len(self.channels)}

    def fit_rows(self, patches: PatchSet, seed: int) -> torch.Tensor:
        """Every patch row [N * h * w, D] of patch features [N, D, h, w], in (image, y, x)
        order: each Gaussian needs its cell of every image (``max-patches`` does not apply)."""
        return patches.flat()

    def fit_local(self, features: torch.Tensor) -> Payload:
        """Site: per-Gaussian count [K], sum [K, C] and outer-product sum [K, C, C] (float64)
        of whole images' patch rows [n * h * w, D]."""
        x = self._by_position(features)
        samples = [x[:, cell].reshape(-1, x.shape[-1]).double() for cell in self.cells]
        stats = {"counts": torch.tensor([float(len(s)) for s in samples], dtype=torch.float64),
                 "sums": torch.stack([s.sum(0) for s in samples]),
                 "outer": torch.stack([s.T @ s for s in samples])}
        return Payload(self.fit_kind, {k: v.cpu().numpy() for k, v in stats.items()},
                       len(features))

    def merge(self, payloads: list[Payload]) -> Payload:
        """Server: the sum of the sites' statistics (the statistics of the pooled patches)."""
        arrays = {name: np.sum([p.arrays[name] for p in payloads], axis=0, dtype=np.float64)
                  for name in ("counts", "sums", "outer")}
        return Payload(self.fit_kind, arrays, sum(p.count for p in payloads))

    def refine_local(self, head: Payload, features: torch.Tensor) -> Payload:
        """Site, later rounds: the same statistics again (the global head needs no update)."""
        return self.fit_local(features)

    def refine(self, head: Payload, payloads: list[Payload]) -> Payload:
        """Server, later rounds: the same pooled statistics again."""
        return self.merge(payloads)

    def gaussians(self, head: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [K, C] and covariances [K, C, C] (unbiased, plus EPS * I; float64) of the
        statistics ``head``."""
        counts, sums, outer = (self.tensor(head.arrays[name], torch.float64)
                               for name in ("counts", "sums", "outer"))
        means = sums / counts[:, None]
        scatter = outer - counts[:, None, None] * means[:, :, None] * means[:, None, :]
        covariances = scatter / (counts - 1).clamp_min(1)[:, None, None]
        covariances = (covariances + covariances.mT) / 2
        eye = torch.eye(len(self.channels), dtype=torch.float64, device=self.device)
        return means, covariances + EPS * eye

    def patch_scores(self, head: Payload, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [n * h * w] of whole images' patch rows [n * h * w, D] to the
        Gaussian of each row's cell."""
        means, roots = self._roots(head)
        x = self._by_position(features)
        # each cell's distances side by side, put back in position order by one gather (an
        # exported graph then scores any number of images, which writing into cells would not)
        by_cell = torch.cat([((x[:, cell].double() - mean) @ root).pow(2).sum(-1).sqrt()
                             for cell, mean, root in zip(self.cells, means, roots, strict=True)],
                            dim=1)  # [n, h * w]
        return by_cell[:, self.cell_order].reshape(-1).float()

    def _roots(self, head: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [K, C] and inverse Cholesky factors L^-T [K, C, C] (Sigma^-1 = L^-T L^-1) of
        ``head``, kept for the last head scored (anomaly_maps scores a set in chunks)."""
        if self._scorer is None or self._scorer[0] is not head:
            means, covariances = self.gaussians(head)
            chol = torch.linalg.cholesky(covariances)
            identity = torch.eye(len(self.channels), dtype=torch.float64,
                                 device=chol.device).expand_as(chol)
            inverse = torch.linalg.solve_triangular(chol, identity, upper=False)
            self._scorer = (head, means, inverse.mT)
        return self._scorer[1], self._scorer[2]

    def _by_position(self, features: torch.Tensor) -> torch.Tensor:
        """The kept channels of whole images' patch rows [n * h * w, D] as [n, h * w, C]."""
        features = self.rows(features)
        h, w = self.grid
        if len(features) % (h * w):
            raise ValueError(f"method=padim: {len(features)} patch rows are not whole images "
                             f"of {h} x {w} positions")
        return features[:, self.channels].reshape(-1, h * w, len(self.channels))


def cells(grid: tuple[int, int], settings: HeadSettings) -> list[torch.Tensor]:
    """The positions (row-major indices into the h x w map) of each Gaussian: the cells of a
    ``gaussian-grid`` x ``gaussian-grid`` grid over the map (per-position) or one cell
    holding every position (shared)."""
    h, w = grid
    if settings.gaussian_positions == "shared":
        return [torch.arange(h * w)]
    side = settings.gaussian_grid
    if side > min(h, w):
        raise ValueError(f"gaussian-grid={side}: more cells per side than the {h} x {w} "
                         f"feature map has positions")
    cell = (torch.arange(h)[:, None] * side // h * side + torch.arange(w)[None] * side // w)
    return [torch.nonzero(cell.flatten() == k)[:, 0] for k in range(side * side)]
