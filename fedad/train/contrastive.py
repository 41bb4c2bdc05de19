"""Contrastive Feature Alignment (Fed-MSVT eq. 7) and the normal prototypes sites share for it.

Eq. (7): L = - sum_{i,j} log( exp(sim(f_i, f_j)/tau) / sum_k exp(sim(f_i, f_k)/tau) ), with
f_i, f_j embeddings of normal samples (positive pairs), f_k embeddings of anomalous samples
(negatives) and sim the cosine similarity. fedad takes the mean over the (i, j) pairs instead of
the sum, so the weight lambda does not depend on the batch size.

Positives: each normal embedding of the batch paired with the normal anchors of the *other*
sites (server-aggregated prototypes, a few vectors per site). Before any anchors exist (round 1,
or a single site) the other normal embeddings of the batch are the positives. Negatives: the
batch's anomalous embeddings (synthetic or real-train defects). A batch without negatives or
without positives contributes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedad.data import AnomalyDataset, Sample
from fedad.device import model_device, to_device


def info_nce(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Eq. (7), averaged over the positive pairs.

    Args:
        queries: [Q, D] normal embeddings f_i.
        positives: [P, D] positive embeddings f_j.
        negatives: [K, D] anomalous embeddings f_k.
        tau: temperature (> 0).
        exclude_self: ``positives`` is ``queries`` itself; pairs (i, i) are left out.
    Returns:
        scalar loss (0 with no pairs or no negatives).
    """
    if tau <= 0:
        raise ValueError(f"cfa-tau={tau}: must be > 0")
    for name, t in (("queries", queries), ("positives", positives), ("negatives", negatives)):
        if t.dim() != 2 or t.shape[1] != queries.shape[1]:
            raise ValueError(f"info_nce: {name} must be [N, {queries.shape[1]}], got "
                             f"{tuple(t.shape)}")
    if len(queries) == 0 or len(negatives) == 0 or len(positives) <= int(exclude_self):
        return queries.new_zeros(())
    q = F.normalize(queries, dim=1)
    pos = q @ F.normalize(positives, dim=1).T / tau  # [Q, P]
    log_denominator = torch.logsumexp(q @ F.normalize(negatives, dim=1).T / tau, dim=1)  # [Q]
    log_ratio = pos - log_denominator[:, None]
    if exclude_self:
        keep = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        return -log_ratio[keep].mean()
    return -log_ratio.mean()


def alignment_loss(
    anchors: torch.Tensor | None, tau: float, weight: float
) -> Callable[[object, torch.Tensor], torch.Tensor]:
    """The CFA term as an extra loss ``(output with .embedding [B, D], labels [B]) -> scalar``.

    Args:
        anchors: [C, D] normal prototypes of the other sites, or None / empty.
        tau: temperature; weight: lambda, the term's weight in the local loss.
    """

    def term(output, labels: torch.Tensor) -> torch.Tensor:
        embedding = output.embedding
        normal, anomalous = embedding[labels == 0], embedding[labels > 0]
        if anchors is not None and len(anchors):
            loss = info_nce(normal, anchors.to(embedding), anomalous, tau)
        else:
            loss = info_nce(normal, normal, anomalous, tau, exclude_self=True)
        return weight * loss

    return term


@torch.no_grad()
def normal_prototype(embeddings: torch.Tensor) -> torch.Tensor:
    """A site's normal prototype: the L2-normalised mean of its normal embeddings [N, D] -> [D]."""
    if embeddings.dim() != 2 or len(embeddings) == 0:
        raise ValueError(f"normal_prototype: expected [N>0, D], got {tuple(embeddings.shape)}")
    prototype = F.normalize(F.normalize(embeddings, dim=1).mean(0), dim=0)
    if not torch.isfinite(prototype).all():
        raise FloatingPointError("normal_prototype: non-finite prototype")
    return prototype


@torch.no_grad()
def embed(model: torch.nn.Module, samples: Sequence[Sample], image_size: int,
          batch_size: int = 16) -> torch.Tensor:
    """``model``'s embeddings [N, D] of ``samples`` (eval mode, no augmentation), computed on
    the model's device, returned on the CPU."""
    if not samples:
        raise ValueError("embed: no samples")
    was_training = model.training
    model.eval()
    device = model_device(model)
    loader = DataLoader(AnomalyDataset(samples, image_size), batch_size=batch_size)
    out = torch.cat([model(to_device(batch["image"], device)).embedding.cpu()
                     for batch in loader])
    model.train(was_training)
    return out
