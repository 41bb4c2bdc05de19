"""The frozen streams' outputs of a set of images, computed once and cached, and the view
augmentations applied to them.

The backbone and DINOv2 never train, so each image's levels and tokens are computed once per
process (half precision) and every epoch and round trains the adapters, projections and heads
on them: training costs the trainable parts only. The augmented views of the consistency loss
(flips and 90-degree rotations, §3.1.3) are applied to the cached maps, not to the image, and
the prediction on a view is restored by the inverse transform: for a convolutional backbone
this is close to, not equal to, the features of the transformed image (docs/methods.md).
Synthetic anomalies (:class:`fedad.train.synthetic_anomalies.AnomalySynthesizer`) are drawn
once per source normal image, seeded, and cached like the real images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedad.data import Sample
from fedad.device import model_device
from fedad.nexvitad.model import FrozenStreams
from fedad.train.loop import make_loader
from fedad.train.synthetic_anomalies import AnomalySynthesizer

log = logging.getLogger(__name__)
STORAGE = torch.float16
BATCH = 8
TRANSFORMS = 8
"""Views: rotation by k * 90 degrees (k = t % 4), then a horizontal flip for t >= 4."""


@dataclass
class FrozenSet:
    """Cached frozen outputs of N images.

    Attributes:
        levels: per level [N, d_n, h_n, w_n] (STORAGE).
        tokens: DINOv2 tokens [N, 384, g, g] (STORAGE).
        masks: [N, S, S] in {0, 1} (float32).
        labels: [N] 0 / 1; categories: [N] names.
        images: [N, S, S, 3] in [0, 1] (float32, for plots).
        defect_classes: [N] index into the run's defect types.
    """

    levels: list[torch.Tensor]
    tokens: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    categories: list[str]
    images: torch.Tensor
    defect_classes: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: torch.Tensor, device: torch.device
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The float32 levels [[b, d_n, h_n, w_n]] and tokens [b, 384, g, g] of rows
        ``index`` [b], on ``device``."""
        return ([m[index].to(device).float() for m in self.levels],
                self.tokens[index].to(device).float())

    def subset(self, keep: Sequence[bool]) -> FrozenSet:
        """The rows where ``keep`` [N] is true."""
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        return FrozenSet([m[index] for m in self.levels], self.tokens[index], self.masks[index],
                         self.labels[index], [self.categories[i] for i in index.tolist()],
                         self.images[index], self.defect_classes[index])

    @staticmethod
    def join(parts: Sequence[FrozenSet]) -> FrozenSet:
        """The rows of ``parts`` one after the other."""
        return FrozenSet(
            [torch.cat([p.levels[n] for p in parts]) for n in range(len(parts[0].levels))],
            torch.cat([p.tokens for p in parts]), torch.cat([p.masks for p in parts]),
            torch.cat([p.labels for p in parts]), [c for p in parts for c in p.categories],
            torch.cat([p.images for p in parts]), torch.cat([p.defect_classes for p in parts]))


_CACHE: dict[tuple, tuple[FrozenStreams, FrozenSet]] = {}
"""Frozen sets (with the streams that computed them, which keeps their id unique) by
(streams' id, image size, image paths, defect types, synthetic draw); cleared when the streams
change."""


def frozen_set(streams: FrozenStreams, samples: Sequence[Sample], image_size: int,
               defect_types: Sequence[str] | None = None, synthetic_seed: int | None = None
               ) -> FrozenSet:
    """The cached frozen outputs of ``samples`` at ``image_size``; with ``synthetic_seed``,
    of one synthetic anomalous copy of each (masks the synthetic ones)."""
    if not samples:
        raise ValueError("nexvitad: no images to encode")
    key = (id(streams), image_size, tuple(str(s.image_path) for s in samples),
           tuple(defect_types or ()), synthetic_seed)
    for stale in [k for k in _CACHE if k[0] != id(streams)]:
        del _CACHE[stale]
    if key not in _CACHE:
        _CACHE[key] = streams, _encode(streams, samples, image_size, defect_types,
                                       synthetic_seed)
    return _CACHE[key][1]


@torch.no_grad()
def _encode(streams: FrozenStreams, samples: Sequence[Sample], image_size: int,
            defect_types: Sequence[str] | None, synthetic_seed: int | None) -> FrozenSet:
    """:func:`frozen_set` without the cache (progress logged every 50 batches)."""
    device = model_device(streams)
    synthesizer = (None if synthetic_seed is None
                   else AnomalySynthesizer(probability=1.0, seed=synthetic_seed))
    loader = make_loader(samples, image_size, BATCH, shuffle=False, defect_types=defect_types)
    parts: dict[str, list] = {k: [] for k in ("levels", "tokens", "masks", "labels", "images",
                                              "defect_classes")}
    started = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        images, masks, labels = batch["image"], batch["mask"][:, 0], batch["label"]
        if synthesizer is not None:
            images, synthetic = synthesizer(images)
            masks, labels = synthetic[:, 0], torch.ones_like(labels)
        levels, tokens = streams(images.to(device))
        parts["levels"].append([m.to("cpu", STORAGE) for m in levels])
        parts["tokens"].append(tokens.to("cpu", STORAGE))
        parts["masks"].append(masks.float())
        parts["labels"].append(labels.long())
        parts["images"].append(images.permute(0, 2, 3, 1).float())
        parts["defect_classes"].append(batch["defect_class"].long())
        if step % 50 == 0:
            log.info("nexvitad: encoded %d of %d images (%.0f s)", step * BATCH, len(samples),
                     time.perf_counter() - started)
    levels = [torch.cat(level) for level in zip(*parts["levels"], strict=True)]
    tokens = torch.cat(parts["tokens"])
    if not all(torch.isfinite(m).all() for m in [*levels, tokens]):
        raise FloatingPointError("nexvitad: non-finite frozen features")
    return FrozenSet(levels, tokens, torch.cat(parts["masks"]), torch.cat(parts["labels"]),
                     [s.category for s in samples], torch.cat(parts["images"]),
                     torch.cat(parts["defect_classes"]))


def transform(x: torch.Tensor, t: int) -> torch.Tensor:
    """View ``t`` (0 <= t < TRANSFORMS) of maps x [..., h, w] (square)."""
    x = torch.rot90(x, t % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if t >= 4 else x


def restore(x: torch.Tensor, t: int) -> torch.Tensor:
    """The inverse of :func:`transform`: restore(transform(x, t), t) == x."""
    x = torch.flip(x, dims=(-1,)) if t >= 4 else x
    return torch.rot90(x, -(t % 4), dims=(-2, -1))
