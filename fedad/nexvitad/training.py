"""NexViTAD's local training and decoder inference (§3.1.2-3.1.3), as a
:class:`fedad.task.ModelRecipe`.

A site trains on what it holds. Source-category images (normal ones, the protocol's third of
real defects with ``use-real-defects``, and ``nexvitad-synthetic-per-image`` synthetic
anomalous copies of each normal one) train their category's segmentation head and the
pseudo-labelling head with pixel cross-entropy (eq. 9), on a random view (flip / rotation).
Target-category images train unlabelled: in the pre-training rounds
(``server_round <= nexvitad-pretrain-rounds``) and without ``nexvitad-pseudo-labels``, by the
consistency of the target head between two views (MSE of the restored anomalous-class
probability); in the joint rounds, with pseudo-labels from the round's global pseudo-labelling
head (refreshed every round; eq. 6: argmax where max softmax > θ, other pixels ignored), by
cross-entropy of the target head on them and the MSE between its prediction on the
augmented view and the pseudo-labels over the labelled pixels (eq. 7). The loss (eq. 8) is
λ_s · L_s + λ_t · (L_t^ce + L_t^mse). The pseudo-labelling head learns from the source labels
(the only labels there are) and is applied, not trained, on the target.

Decoder inference (the paper's "original decoder", an ablation of §4.4.1): the anomalous-class
probability of each image's category head (the target head for the target), Gaussian-smoothed;
image score its maximum.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import Sample
from fedad.device import cpu_numpy, model_device
from fedad.experiment import resolve_categories, resolve_root
from fedad.heads.settings import HeadSettings
from fedad.models.anomaly_map import MapSettings, smooth_maps
from fedad.nexvitad.frozen import TRANSFORMS, FrozenSet, frozen_set, restore, transform
from fedad.nexvitad.model import NexViTAD
from fedad.nexvitad.settings import NexViTADSettings
from fedad.task import ExtraLoss, ModelRecipe
from fedad.train.loop import train_loop
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)
IGNORE = -1
"""Pseudo-label of a pixel below the confidence threshold."""
LOSS_TERMS = ("source_ce", "pseudo_ce", "target_ce", "target_mse")
"""Every site reports each term (0 where it has none): strategies need equal metric keys."""


def run_categories(cfg: ExperimentConfig) -> tuple[tuple[str, ...], str]:
    """(source categories, target category) of the run; ConfigError naming target-category
    when it is unset or not among the run's categories, or leaves no source category."""
    categories = resolve_categories(cfg, resolve_root(cfg))
    target = cfg.section(HeadSettings).target_category
    if target not in categories:
        raise ConfigError(f"target-category={target!r}: method=nexvitad needs one of the run's "
                          f"categories {', '.join(categories)} as the target")
    sources = tuple(c for c in categories if c != target)
    if not sources:
        raise ConfigError(f"category={cfg.category!r}: method=nexvitad needs source categories "
                          f"besides target-category={target!r}")
    return sources, target


def build_nexvitad(cfg: ExperimentConfig) -> NexViTAD:
    """The NexViTAD of ``cfg``: frozen pretrained streams, fresh adapters, projections and
    heads (one per source category of the run)."""
    sources, _ = run_categories(cfg)
    return NexViTAD(cfg.section(NexViTADSettings), sources)


def pseudo_labels(logits: torch.Tensor, theta: float) -> torch.Tensor:
    """Eq. 5-6: logits [B, 2, H, W] -> labels [B, H, W] (long): the argmax class where its
    softmax probability exceeds ``theta``, IGNORE elsewhere."""
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"pseudo-label logits: expected [B, 2, H, W], got {list(logits.shape)}")
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    return torch.where(confidence > theta, labels, torch.full_like(labels, IGNORE))


def upsampled(logits: torch.Tensor, side: int) -> torch.Tensor:
    """logits [B, 2, h, w] -> [B, 2, side, side] (bilinear)."""
    return F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)


class SiteData:
    """A site's frozen training sets and, in joint rounds, the target's pseudo-labels."""

    def __init__(self, model: NexViTAD, samples: Sequence[Sample], cfg: ExperimentConfig
                 ) -> None:
        settings = cfg.section(NexViTADSettings)
        self.target = cfg.section(HeadSettings).target_category
        streams, size = model.encoder.frozen, cfg.image_size
        sources = [s for s in samples if s.category != self.target]
        normal = [s for s in sources if s.label == 0]
        targets = [s for s in samples if s.category == self.target]
        site_seed = cfg.seed + zlib.crc32(str(samples[0].image_path).encode()) if samples else 0
        parts = [frozen_set(streams, sources, size)] if sources else []
        parts += [frozen_set(streams, normal, size, synthetic_seed=site_seed + j)
                  for j in range(settings.nexvitad_synthetic_per_image) if normal]
        self.source = FrozenSet.join(parts) if parts else None
        self.target_set = frozen_set(streams, targets, size) if targets else None
        self.pseudo: torch.Tensor | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in (self.source, self.target_set) if s is not None)

    @torch.no_grad()
    def refresh_pseudo_labels(self, model: NexViTAD, theta: float, batch: int) -> float:
        """Pseudo-labels [N, S, S] of the target images under ``model``'s pseudo-labelling
        head (eq. 6); returns the labelled share of pixels."""
        assert self.target_set is not None
        model.eval()
        device, side = model_device(model), self.target_set.masks.shape[-1]
        out = []
        for index in torch.arange(len(self.target_set)).split(batch):
            fused = model.encoder.fuse(*self.target_set.rows(index, device))
            out.append(pseudo_labels(upsampled(model.pseudo_head(fused), side), theta).cpu())
        self.pseudo = torch.cat(out)
        return float((self.pseudo != IGNORE).float().mean())

    def batches(self, batch_size: int, generator: torch.Generator
                ) -> Iterator[tuple[str, torch.Tensor, int]]:
        """One epoch: (set name "source" | "target", row indices [b], view) in a seeded
        order, each batch from one set."""
        chunks = []
        for name, rows in (("source", self.source), ("target", self.target_set)):
            if rows is not None:
                order = torch.randperm(len(rows), generator=generator)
                chunks += [(name, index) for index in order.split(batch_size)]
        for i in torch.randperm(len(chunks), generator=generator).tolist():
            view = int(torch.randint(TRANSFORMS, (1,), generator=generator))
            yield chunks[i][0], chunks[i][1], view


def source_loss(model: NexViTAD, data: SiteData, index: torch.Tensor, view: int,
                use_pseudo: bool) -> dict[str, torch.Tensor]:
    """Eq. 9 on source rows ``index`` [b] seen in ``view``: the cross-entropy of each image's
    category head (and of the pseudo-labelling head) against its mask."""
    rows = data.source
    device = model_device(model)
    levels, tokens = rows.rows(index, device)
    fused = model.encoder.fuse([transform(m, view) for m in levels], transform(tokens, view))
    masks = transform(rows.masks[index].to(device), view).long()
    side = masks.shape[-1]
    categories = [rows.categories[i] for i in index.tolist()]
    logits = upsampled(model.segment_rows(fused, categories, data.target), side)
    losses = {"source_ce": F.cross_entropy(logits, masks)}
    if use_pseudo:
        losses["pseudo_ce"] = F.cross_entropy(upsampled(model.pseudo_head(fused), side), masks)
    return losses


def target_loss(model: NexViTAD, data: SiteData, index: torch.Tensor, view: int
                ) -> dict[str, torch.Tensor]:
    """Target rows ``index`` [b]: with pseudo-labels, eq. 7's MSE between the restored
    prediction on ``view`` and the labels plus the cross-entropy on them (labelled pixels
    only); without, the MSE between the two views' anomalous-class probabilities."""
    rows = data.target_set
    device = model_device(model)
    levels, tokens = rows.rows(index, device)
    side = rows.masks.shape[-1]
    plain = upsampled(model.segment(model.encoder.fuse(levels, tokens), data.target,
                                    data.target), side)
    seen = model.encoder.fuse([transform(m, view) for m in levels], transform(tokens, view))
    augmented = restore(upsampled(model.segment(seen, data.target, data.target), side), view)
    probability = augmented.softmax(dim=1)[:, 1]
    if data.pseudo is None:
        return {"target_mse": F.mse_loss(probability, plain.softmax(dim=1)[:, 1].detach())}
    labels = data.pseudo[index].to(device)
    valid = labels != IGNORE
    if not valid.any():
        zero = probability.sum() * 0
        return {"target_ce": zero, "target_mse": zero}
    return {"target_ce": F.cross_entropy(plain, labels, ignore_index=IGNORE),
            "target_mse": ((probability - labels.float())[valid] ** 2).mean()}


def fit_nexvitad(model: NexViTAD, samples: Sequence[Sample], cfg: ExperimentConfig, *,
                 seed: int, server_round: int, extra_loss: ExtraLoss | None = None
                 ) -> dict[str, float]:
    """One site's local NexViTAD training for a round (module docstring).

    Returns:
        the last epoch's mean losses (``train_*``), ``num-examples`` (training items,
        synthetic copies included), ``train_seconds``, ``pretraining`` (1.0 / 0.0) and
        ``pseudo_labelled`` (the labelled share of target pixels; 0 without pseudo-labels).
    """
    settings = cfg.section(NexViTADSettings)
    start = time.perf_counter()
    data = SiteData(model, samples, cfg)
    if not len(data):
        raise ValueError("nexvitad: the site holds no training images")
    pretraining = server_round <= settings.nexvitad_pretrain_rounds
    labelled = 0.0
    if data.target_set is not None and settings.nexvitad_pseudo_labels and not pretraining:
        labelled = data.refresh_pseudo_labels(model, settings.nexvitad_theta, cfg.batch_size)
    use_pseudo = settings.nexvitad_pseudo_labels
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    model.train()

    def step(batch: tuple[str, torch.Tensor, int]):
        name, index, view = batch
        if name == "source":
            terms = source_loss(model, data, index, view, use_pseudo)
            loss = settings.nexvitad_lambda_s * sum(terms.values())
        else:
            terms = target_loss(model, data, index, view)
            loss = settings.nexvitad_lambda_t * sum(terms.values())
        labels = torch.zeros(len(index), device=model_device(model))
        return None, labels, {"loss": loss, **terms}

    epochs = (data.batches(cfg.batch_size, generator) for _ in range(cfg.local_epochs))
    result = train_loop(step, epochs, optimizer, params, max_batches=cfg.max_train_batches,
                        extra_loss=extra_loss, precision=cfg.precision, name="nexvitad")
    result.update({f"train_{term}": result.get(f"train_{term}", 0.0) for term in LOSS_TERMS})
    result.update({"num-examples": len(data), "train_seconds": time.perf_counter() - start,
                   "pretraining": float(pretraining), "pseudo_labelled": labelled})
    log.info("nexvitad: %d source + %d target items, %.1f s", len(data.source or ()),
             len(data.target_set or ()), result["train_seconds"])
    return result


@torch.no_grad()
def decoder_maps(model: NexViTAD, rows: FrozenSet, target: str, batch: int) -> np.ndarray:
    """Anomalous-class probability maps [N, S, S] of each row's category head."""
    model.eval()
    device, side = model_device(model), rows.masks.shape[-1]
    maps = []
    for index in torch.arange(len(rows)).split(batch):
        fused = model.encoder.fuse(*rows.rows(index, device))
        categories = [rows.categories[i] for i in index.tolist()]
        logits = upsampled(model.segment_rows(fused, categories, target), side)
        maps.append(cpu_numpy(logits.softmax(dim=1)[:, 1]))
    return np.concatenate(maps)


def predict_nexvitad(model: NexViTAD, samples: Sequence[Sample], cfg: ExperimentConfig,
                     defect_types: Sequence[str] | None = None) -> Predictions:
    """Decoder inference on ``samples``: maps [N, S, S] (smoothed anomalous-class
    probability, 0.5 the decision threshold) and their maxima as image scores."""
    rows = frozen_set(model.encoder.frozen, samples, cfg.image_size, defect_types)
    target = cfg.section(HeadSettings).target_category
    sigma = cfg.section(MapSettings).sigma(cfg.method, cfg.image_size)
    maps = smooth_maps(decoder_maps(model, rows, target, max(cfg.batch_size, 16)), sigma)
    return Predictions(rows.labels.numpy(), rows.defect_classes.numpy(),
                       maps.reshape(len(maps), -1).max(1), rows.masks.numpy(), maps,
                       rows.images.numpy()).check()


def trained_prefixes(model: NexViTAD, categories: Sequence[str], target: str) -> tuple[str, ...]:
    """State-dict prefixes a site holding ``categories`` trains: the adapters and projections,
    its categories' segmentation heads, and the pseudo-labelling head where it holds a source
    category (its labels train it)."""
    prefixes = {"encoder.adapters.", "encoder.projections."}
    prefixes |= {model.head_name(c, target) + "." for c in categories}
    if any(c != target for c in categories) and model.settings.nexvitad_pseudo_labels:
        prefixes.add("pseudo_head.")
    return tuple(sorted(prefixes))


NEXVITAD_RECIPE = ModelRecipe(build_nexvitad, fit_nexvitad, predict_nexvitad)
"""method=nexvitad's training stage (:func:`fedad.federation.train_global_model`)."""

