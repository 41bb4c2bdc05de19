"""A run's global model as one uniform scorer: images [B, 3, S, S] in [0, 1] -> (image scores
[B], anomaly maps [B, S, S]), calibrated to [0, 1] as the run's
:class:`~fedad.train.predictions.Predictions` are (0.5 is the method's decision threshold).

A scorer is a torch module from pixels to scores, smoothing included (the runs' own
:class:`~fedad.models.anomaly_map.GaussianSmoothing`), so that ``fedad predict`` and
``fedad export`` run the same graph. :meth:`Scorer.raw` gives the uncalibrated scores and maps
(what the run's metrics rank), :meth:`Scorer.forward` the calibrated ones. :data:`SCORERS`
builds one per method from the run's config and checkpoint state; a new method adds one entry;
:func:`build_scorer` puts it on the run's device (``device``), where its callers move their
image batches (:attr:`Scorer.device`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedad.config import ExperimentConfig
from fedad.device import device_of, model_device
from fedad.heads.base import FeatureHead, check_features
from fedad.heads.gmm import MixtureDensity
from fedad.heads.payload import Payload
from fedad.heads.registry import HEADS, extractor_for, head_for, head_settings
from fedad.heads.scoring import PATCHES_PER_CHUNK, STORAGE_DTYPE, ScoreScale
from fedad.heads.whitening import Whitening, whiten
from fedad.heads.workflow import restore_head
from fedad.mae.scoring import anomaly_error, error_extractor, inference_masks
from fedad.mae.settings import MAESettings
from fedad.mae.training import map_sigma as mae_sigma
from fedad.mae.training import to_unit_interval
from fedad.models import load_trainable_state_dict
from fedad.models.anomaly_map import GaussianSmoothing, MapSettings
from fedad.task import build_model

Checkpoint = dict
"""A round checkpoint as :class:`fedad.results.ResultsWriter` saves it: ``round``,
``state_dict``, ``strategy`` (the strategy's or workflow's state)."""


class Scorer(nn.Module, ABC):
    """images [B, 3, S, S] in [0, 1] -> (scores [B], maps [B, S, S]) in [0, 1], in eval mode.

    Args:
        image_size: S, the side images are resized to before scoring.
        sigma: the map smoothing, pixels.
    """

    def __init__(self, image_size: int, sigma: float) -> None:
        super().__init__()
        self.image_size = image_size
        self.smooth = GaussianSmoothing(sigma, image_size)

    @abstractmethod
    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> uncalibrated (scores [B], maps [B, S, S])."""

    def calibrate(self, scores: torch.Tensor, maps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (scores [B], maps [B, S, S]) -> calibrated to [0, 1]; the identity here."""
        return scores, maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> calibrated (scores [B], maps [B, S, S])."""
        return self.calibrate(*self.raw(images))

    def defect_types(self, images: torch.Tensor) -> list[str] | None:
        """The predicted defect type of each image [B, 3, S, S], or None for a method that
        predicts none."""
        return None

    @property
    def device(self) -> torch.device:
        """Where the scorer computes: image batches go there, its outputs come back from it."""
        return model_device(self)

    def exported(self) -> Scorer:
        """The scorer that export traces (this one; see :meth:`HeadScorer.exported`)."""
        return self

    def train(self, mode: bool = True) -> Scorer:
        """A scorer stays in eval mode."""
        return super().train(False)


def _max(maps: torch.Tensor) -> torch.Tensor:
    """maps [B, S, S] -> their maxima [B]."""
    return maps.flatten(1).amax(1)


class MSVTScorer(Scorer):
    """MSVT (:func:`fedad.msvt.training.predict`): smoothed sigmoid map; image score = mean of
    the image head's probability and the map's maximum."""

    def __init__(self, model: nn.Module, image_size: int, sigma: float) -> None:
        super().__init__(image_size, sigma)
        self.model = model

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(images)
        maps = self.smooth(torch.sigmoid(output.anomaly_logits)[:, 0])
        return 0.5 * (torch.sigmoid(output.image_logit) + _max(maps)), maps


class MAEScorer(Scorer):
    """MAE (:func:`fedad.mae.training.predict_mae`): the smoothed error of the reconstruction
    from ``passes`` masked passes under ``extractor`` (:func:`fedad.mae.scoring.anomaly_error`),
    image score its maximum, both as e / (e + t) at the model's thresholds. The passes' masks
    are a buffer (constants of an exported graph)."""

    def __init__(self, model: nn.Module, image_size: int, sigma: float, passes: int,
                 extractor: nn.Module | None) -> None:
        super().__init__(image_size, sigma)
        self.model, self.extractor = model, extractor
        self.register_buffer("masks", inference_masks(model.grid, passes), False)

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.smooth(anomaly_error(self.model, images, self.masks, self.extractor))
        return _max(maps), maps

    def calibrate(self, scores: torch.Tensor, maps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return (to_unit_interval(scores, float(self.model.image_threshold)),
                to_unit_interval(maps, float(self.model.pixel_threshold)))


class DetectorScorer(Scorer):
    """D-ADDA's detector (:func:`fedad.dadda.detector.predict_detector`): the localizer's
    smoothed sigmoid map, image score its maximum; the classifier names the defect type."""

    def __init__(self, model: nn.Module, image_size: int, sigma: float,
                 types: tuple[str, ...]) -> None:
        super().__init__(image_size, sigma)
        self.model = model
        self.types = types

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.smooth(torch.sigmoid(self.model.localizer(images))[:, 0])
        return _max(maps), maps

    def defect_types(self, images: torch.Tensor) -> list[str]:
        """The type [B] the classifier ranks first (:func:`fedad.dadda.detector.classify`)."""
        return [self.types[i] for i in self.model.class_logits(images).argmax(1).tolist()]


class PatchScores(nn.Module):
    """Patch features [N, D] -> scores [N] under a run's global head: the head's own
    :meth:`~fedad.heads.base.FeatureHead.patch_scores`, after the run's whitening."""

    def __init__(self, head: FeatureHead, payload: Payload, whitening: Whitening | None) -> None:
        super().__init__()
        self.head, self.payload, self.whitening = head, payload, whitening

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Whitened patch features [N, D] -> scores [N]."""
        return self.head.patch_scores(self.payload, features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features [N, D] -> scores [N]."""
        return self.score(whiten(check_features(features, self.head.dim), self.whitening))


class FlowScores(PatchScores):
    """A flow head's scores with the head's flow loaded once, as a submodule (the head loads
    it per call, which a traced graph cannot hold)."""

    def __init__(self, head: FeatureHead, payload: Payload, whitening: Whitening | None) -> None:
        super().__init__(head, payload, whitening)
        self.flow = head.load_flow(payload).eval().requires_grad_(False)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [N] of whitened patch features [N, D] under the flow."""
        return -self.flow.log_prob(features)


class MixtureScores(PatchScores):
    """A mixture head's negative log-likelihood by its
    :class:`~fedad.heads.gmm.MixtureDensity`, built once as a submodule."""

    def __init__(self, head: FeatureHead, payload: Payload, whitening: Whitening | None) -> None:
        super().__init__(head, payload, whitening)
        self.density = MixtureDensity(payload)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood [N] of whitened patch features [N, D]."""
        return self.density(features)


PATCH_SCORES: dict[str, type[PatchScores]] = {"flow": FlowScores, "gmm": MixtureScores}
"""Heads whose scores a scorer computes in a traceable form of its own (the others: the
head's own ``patch_scores``)."""


class HeadScorer(Scorer):
    """A feature head (:func:`fedad.heads.workflow.evaluate_head`): the frozen extractor's
    patch features (rounded to ``storage_dtype`` as the run stored them), scored by the global
    head (``patch_scores``), upsampled, smoothed, less the map baseline [S, S]; image score
    the maximum, or the mean of the ``topk`` highest pixels; the run's logistic calibration.
    The head's arrays, whitening, baseline and calibration are constants of the graph.
    """

    def __init__(self, extractor: nn.Module, patch_scores: PatchScores, image_size: int,
                 sigma: float, baseline: torch.Tensor | None, scale: ScoreScale, topk: int,
                 storage_dtype: torch.dtype | None = STORAGE_DTYPE) -> None:
        super().__init__(image_size, sigma)
        self.extractor = extractor
        self.patch_scores = patch_scores
        self.scale = scale
        self.topk = topk
        self.storage_dtype = storage_dtype
        self.register_buffer("baseline", torch.zeros(image_size, image_size) if baseline is None
                             else baseline.float(), False)

    def exported(self) -> HeadScorer:
        """This scorer with float32 features: rounding them to float16 as the sites store
        them would turn a runtime's last-bit differences into whole float16 steps."""
        clone = copy.copy(self)
        clone.storage_dtype = None
        return clone

    def _patch_maps(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, D, h, w] -> patch scores [n, 1, h, w] (float32)."""
        n, d, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, d).float()
        return self.patch_scores(flat).reshape(n, 1, h, w).float()

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(images)
        if self.storage_dtype is not None:
            features = features.to(self.storage_dtype)
        per_chunk = max(1, PATCHES_PER_CHUNK // (features.shape[-2] * features.shape[-1]))
        patch_maps = (self._patch_maps(features) if len(features) <= per_chunk else
                      torch.cat([self._patch_maps(part) for part in features.split(per_chunk)]))
        maps = F.interpolate(patch_maps, size=(self.image_size, self.image_size),
                             mode="bilinear", align_corners=False)[:, 0]
        maps = self.smooth(maps) - self.baseline
        flat = maps.flatten(1)
        scores = flat.amax(1) if not self.topk else flat.topk(self.topk, dim=1).values.mean(1)
        return scores, maps

    def calibrate(self, scores: torch.Tensor, maps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """sigmoid((v - threshold) / scale), clipped at +-50 (:meth:`ScoreScale.apply`)."""
        def squash(values: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
            return torch.sigmoid(((values - threshold) / scale).clamp(-50, 50))
        s = self.scale
        return (squash(scores, s.image_threshold, s.image_scale),
                squash(maps, s.pixel_threshold, s.pixel_scale))


def _model(cfg: ExperimentConfig, checkpoint: Checkpoint) -> nn.Module:
    """The run's one federated model (:func:`fedad.task.build_model`) with the checkpoint's
    trainable state, in eval mode."""
    model = build_model(cfg)
    load_trainable_state_dict(model, checkpoint["state_dict"])
    return model.eval()


def msvt_scorer(cfg: ExperimentConfig, checkpoint: Checkpoint) -> Scorer:
    """The MSVT scorer of a run (config and round checkpoint)."""
    sigma = cfg.section(MapSettings).sigma("msvt", cfg.image_size)
    return MSVTScorer(_model(cfg, checkpoint), cfg.image_size, sigma)


def mae_scorer(cfg: ExperimentConfig, checkpoint: Checkpoint) -> Scorer:
    """The MAE scorer of a run (config and round checkpoint)."""
    s = cfg.section(MAESettings)
    return MAEScorer(_model(cfg, checkpoint), cfg.image_size, mae_sigma(cfg),
                     s.mae_inference_passes, error_extractor(s.mae_error))


def detector_scorer(cfg: ExperimentConfig, checkpoint: Checkpoint) -> Scorer:
    """D-ADDA's detector scorer of a run (config and round checkpoint of its stage 4)."""
    from fedad.dadda.detector import defect_types_of

    sigma = cfg.section(MapSettings).sigma("dadda", cfg.image_size)
    return DetectorScorer(_model(cfg, checkpoint), cfg.image_size, sigma, defect_types_of(cfg))


def head_scorer(cfg: ExperimentConfig, checkpoint: Checkpoint) -> Scorer:
    """A feature head's scorer of a run: the global head, whitening, map baseline and
    calibration of the round checkpoint (:mod:`fedad.heads.workflow`)."""
    settings = head_settings(cfg)
    state, strategy = checkpoint["state_dict"], checkpoint["strategy"]
    payload, whitening = restore_head(state, strategy)
    patch_scores = PATCH_SCORES.get(cfg.method, PatchScores)(head_for(cfg), payload, whitening)
    topk = 0 if settings.image_score == "max" else max(
        1, round(settings.topk_fraction * cfg.image_size**2))
    return HeadScorer(extractor_for(cfg), patch_scores, cfg.image_size,
                      settings.sigma(cfg.method, cfg.image_size), state.get("map_baseline"),
                      ScoreScale(**strategy["scale"]), topk)


SCORERS: dict[str, Callable[[ExperimentConfig, Checkpoint], Scorer]] = {
    "msvt": msvt_scorer, "mae": mae_scorer, "dadda": detector_scorer,
    **dict.fromkeys(HEADS, head_scorer),
}
"""The scorer builder of each method: (run config, round checkpoint) -> :class:`Scorer`."""


def build_scorer(cfg: ExperimentConfig, checkpoint: Checkpoint) -> Scorer:
    """``cfg.method``'s scorer of ``checkpoint`` (:data:`SCORERS`), in eval mode, on the run's
    device on this machine (:func:`fedad.device.device_of`: ConfigError when it lacks it)."""
    return SCORERS[cfg.method](cfg, checkpoint).to(device_of(cfg)).eval()

SCORER_STRATEGY: dict[str, tuple[str, ...]] = dict.fromkeys(HEADS, ("scale", "kind", "count"))
"""The entries of a checkpoint's workflow state (``strategy``) that a method's builder reads
(none for the others: their strategies' state is per-site history, e.g. ACA's)."""


def scorer_checkpoint(method: str, checkpoint: Checkpoint) -> Checkpoint:
    """The part of a round checkpoint that ``method``'s builder reads: ``round``,
    ``state_dict`` and the :data:`SCORER_STRATEGY` entries of ``strategy`` (what a site gets
    to rebuild the scorer, :mod:`fedad.thresholds`)."""
    strategy = checkpoint.get("strategy", {})
    return {"round": checkpoint["round"], "state_dict": checkpoint["state_dict"],
            "strategy": {key: strategy[key] for key in SCORER_STRATEGY.get(method, ())}}
