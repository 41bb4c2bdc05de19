"""What a site does for a feature head: report the moments of its normal patch features (for
the global whitening), fit or refine on those features, report the mean anomaly map of its
normal images (for the map baseline) and score moments of its normal validation images for
calibration. Features stay here."""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from fedad.config import ExperimentConfig
from fedad.device import device_of, float64_device, to_device
from fedad.experiment import prepare_data
from fedad.heads.payload import Payload
from fedad.heads.registry import extractor_for, feature_grid, head_for, head_settings
from fedad.heads.scoring import (
    PatchSet,
    anomaly_maps,
    extract_patches,
    normal_map,
    score_moments,
)
from fedad.heads.whitening import Whitening, feature_moments, whiten
from fedad.payloads import digest

log = logging.getLogger(__name__)
MEMORY_SHARE = 0.8
"""Share of the free memory a site's patch features may take (the rest: model, maps, head)."""


@functools.lru_cache(maxsize=16)
def normal_patches(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                   role: str) -> PatchSet | None:
    """Patch features of the site's normal ``role`` images ("train" | "val"), without the
    target category in a cross-domain run (only it with ``target-normals``); None when the
    site has none (cached per process)."""
    settings = head_settings(cfg)
    target, own = settings.target_category, settings.target_normals and settings.target_category
    samples = [s for s in prepare_data(cfg, num_partitions).samples(partition_id, role)
               if s.label == 0 and (s.category == target if own else s.category != target)]
    if not samples:
        return None
    check_memory(cfg, partition_id, role, len(samples))
    log.info("partition %d: extracting %s features of %d normal images", partition_id, role,
             len(samples))
    return extract_patches(extractor_for(cfg), samples, cfg.image_size,
                           precision=cfg.precision)


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable of /proc/meminfo; the
    physical memory where that file does not exist)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: ExperimentConfig, partition_id: int, role: str, count: int) -> None:
    """Refuse, before extracting anything, a site whose ``count`` normal ``role`` images would
    not fit in the free memory (MemoryError in one line naming the settings to lower)."""
    settings = head_settings(cfg)
    need = PatchSet.bytes_for(count, extractor_for(cfg).dim, feature_grid(cfg), cfg.image_size)
    free = available_memory()
    if need > MEMORY_SHARE * free:
        raise MemoryError(
            f"partition {partition_id}: its {count} normal {role} images need about "
            f"{need / 1e9:.1f} GB of patch features ({need / count / 1e6:.1f} MB each at "
            f"image-size={cfg.image_size}, feature-scales={settings.feature_scales}, "
            f"feature-layers={settings.feature_layers}), more than {MEMORY_SHARE:.0%} of the "
            f"{free / 1e9:.1f} GB free here: lower feature-scales, feature-layers or image-size")


def site_feature_moments(cfg: ExperimentConfig, partition_id: int,
                         num_partitions: int) -> Payload | None:
    """Moments of the site's normal training patch features (the ``max-patches`` subsample the
    head is fitted on, computed on the head's device); None when the site holds no normal
    training images."""
    patches = normal_patches(cfg, partition_id, num_partitions, "train")
    if patches is None:
        return None
    rows = patches.flat(head_settings(cfg).max_patches, seed=cfg.seed + partition_id)
    return feature_moments(to_device(rows, float64_device(device_of(cfg))))


def fit_or_refine(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                  global_head: Payload | None, whitening: Whitening | None = None
                  ) -> Payload | None:
    """Round 1 (no global head): the site's own head; later: its refinement reply, on
    features whitened by the server's ``whitening`` if any. None when the site holds no
    normal training images (it abstains)."""
    patches = normal_patches(cfg, partition_id, num_partitions, "train")
    if patches is None:
        return None
    head = head_for(cfg)
    features = whiten(to_device(head.fit_rows(patches, seed=cfg.seed + partition_id),
                                head.device), whitening)
    if global_head is None:
        return head.fit_local(features)
    return head.refine_local(global_head, features)


_NORMAL_MAPS: dict[tuple, np.ndarray] = {}
"""Raw normal maps under the last global head (and whitening), by site and role."""


def normal_maps(cfg: ExperimentConfig, partition_id: int, num_partitions: int, role: str,
                global_head: Payload, whitening: Whitening | None = None) -> np.ndarray | None:
    """Raw anomaly maps [N, S, S] of the site's normal ``role`` images ("train" | "val") under
    ``global_head``; None when it has none. The last head's maps are kept (per process): a
    round's ``normal-map`` and ``evaluate`` messages score the same images under one head."""
    patches = normal_patches(cfg, partition_id, num_partitions, role)
    if patches is None:
        return None
    scored_by = (digest(global_head.arrays),
                 None if whitening is None else digest(vars(whitening)))
    key = (cfg, partition_id, num_partitions, role, scored_by)
    if key not in _NORMAL_MAPS:
        for stale in [k for k in _NORMAL_MAPS if k[-1] != scored_by]:
            del _NORMAL_MAPS[stale]
        _NORMAL_MAPS[key] = anomaly_maps(head_for(cfg), global_head, patches.features,
                                         cfg.image_size,
                                         head_settings(cfg).sigma(cfg.method, cfg.image_size),
                                         whitening=whitening)
    return _NORMAL_MAPS[key]


def site_normal_map(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                    global_head: Payload, whitening: Whitening | None = None) -> Payload | None:
    """The ``normal-map`` payload: mean raw anomaly map [S, S] of all the site's normal images
    (training and validation) under the global head; None when it holds none."""
    sets = [maps for role in ("train", "val") if (maps := normal_maps(
        cfg, partition_id, num_partitions, role, global_head, whitening)) is not None]
    return normal_map(np.concatenate(sets)) if sets else None


def calibration_moments(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                        global_head: Payload, whitening: Whitening | None = None,
                        baseline: np.ndarray | None = None) -> dict[str, float] | None:
    """Score moments of the site's normal validation images (training images when it has no
    validation images) under the global head, their maps less ``baseline`` [S, S] if given;
    None when it has neither."""
    maps = next((m for role in ("val", "train") if (m := normal_maps(
        cfg, partition_id, num_partitions, role, global_head, whitening)) is not None), None)
    if maps is None:
        return None
    return score_moments(maps, head_settings(cfg), baseline)
