"""Feature heads by method name, and the extractor / head a config asks for."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import torch

from fedad.config import ConfigError, ExperimentConfig
from fedad.device import device_of, model_device
from fedad.heads.base import FeatureHead
from fedad.heads.features import PatchFeatureExtractor, build_extractor
from fedad.heads.flow import FlowHead
from fedad.heads.gaussian import GaussianHead
from fedad.heads.gmm import GaussianMixtureHead
from fedad.heads.memory_bank import MemoryBankHead
from fedad.heads.settings import HeadSettings

HEADS: dict[str, type[FeatureHead]] = {
    "memorybank": MemoryBankHead, "gmm": GaussianMixtureHead, "flow": FlowHead,
    "padim": GaussianHead,
}


def head_settings(cfg: ExperimentConfig) -> HeadSettings:
    """The run's :class:`HeadSettings` (ConfigError naming a bad key)."""
    return cfg.section(HeadSettings)


def head_settings_from(items: Iterable[str]) -> HeadSettings:
    """HeadSettings from ``KEY=VALUE`` strings of run-config keys (values converted to the field
    types); ConfigError naming a malformed item, a key that is not a HeadSettings key, or a
    value that does not fit."""
    items = list(items)
    keys = {field.name.replace("_", "-") for field in dataclasses.fields(HeadSettings)}
    wrong = [item for item in items if item.split("=", 1)[0] not in keys or "=" not in item]
    if wrong:
        raise ConfigError(f"{' '.join(wrong)}: expected KEY=VALUE with KEY a feature-head "
                          f"setting ({', '.join(sorted(keys))})")
    return ExperimentConfig(extra=dict(item.split("=", 1) for item in items)).section(HeadSettings)


def settings_extractor(settings: HeadSettings, image_size: int,
                       msvt_backbone: str = "lite0") -> PatchFeatureExtractor:
    """The patch feature extractor ``settings`` describe, for images of ``image_size``."""
    return build_extractor(settings.feature_source, layers=settings.layers(),
                           neighbourhood=settings.feature_neighbourhood, image_size=image_size,
                           pretrained=settings.feature_pretrained,
                           checkpoint=settings.feature_checkpoint, msvt_backbone=msvt_backbone,
                           padding=settings.feature_padding, scales=settings.scales(),
                           photometric=settings.feature_photometric,
                           centring=settings.feature_centring)


@functools.lru_cache(maxsize=2)
def extractor_for(cfg: ExperimentConfig) -> PatchFeatureExtractor:
    """The run's patch feature extractor on the run's device (built once per process)."""
    return settings_extractor(head_settings(cfg), cfg.image_size, cfg.backbone).to(
        device_of(cfg))


@functools.lru_cache(maxsize=2)
def feature_grid(cfg: ExperimentConfig) -> tuple[int, int]:
    """(h, w) of the run's patch feature maps [N, D, h, w] (from one grey image)."""
    side = cfg.image_size
    extractor = extractor_for(cfg)
    features = extractor(torch.full((1, 3, side, side), 0.5, device=model_device(extractor)))
    return int(features.shape[-2]), int(features.shape[-1])


def head_for(cfg: ExperimentConfig) -> FeatureHead:
    """The head of ``cfg.method`` for the extractor's feature width and grid, seeded by
    ``cfg.seed``, computing on the run's device."""
    if cfg.method not in HEADS:
        raise ValueError(f"method={cfg.method!r} is not a feature head ({', '.join(HEADS)})")
    return HEADS[cfg.method](head_settings(cfg), extractor_for(cfg).dim, cfg.seed,
                             feature_grid(cfg), device_of(cfg))
