"""What a site does for a feature head: fit or refine on its own normal patch features, and
report score moments of its normal validation images for calibration. Features stay here."""

from __future__ import annotations

import functools
import logging

from fedad.config import ExperimentConfig
from fedad.experiment import prepare_data
from fedad.heads.payload import Payload
from fedad.heads.registry import extractor_for, head_for, head_settings
from fedad.heads.scoring import PatchSet, anomaly_maps, extract_patches, image_scores, score_moments

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def normal_patches(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                   role: str) -> PatchSet | None:
    """Patch features of the site's normal ``role`` images ("train" | "val"), without the
    target category in a cross-domain run; None when the site has none (cached per process)."""
    target = head_settings(cfg).target_category
    samples = [s for s in prepare_data(cfg, num_partitions).samples(partition_id, role)
               if s.label == 0 and s.category != target]
    if not samples:
        return None
    log.info("partition %d: extracting %s features of %d normal images", partition_id, role,
             len(samples))
    return extract_patches(extractor_for(cfg), samples, cfg.image_size)


def fit_or_refine(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                  global_head: Payload | None) -> Payload | None:
    """Round 1 (no global head): the site's own head; later: its refinement reply. None when
    the site holds no normal training images (it abstains)."""
    patches = normal_patches(cfg, partition_id, num_partitions, "train")
    if patches is None:
        return None
    head = head_for(cfg)
    features = patches.flat(head_settings(cfg).max_patches, seed=cfg.seed + partition_id)
    if global_head is None:
        return head.fit_local(features)
    return head.refine_local(global_head, features)


def calibration_moments(cfg: ExperimentConfig, partition_id: int, num_partitions: int,
                        global_head: Payload) -> dict[str, float] | None:
    """Score moments of the site's normal validation images (training images when it has no
    validation images) under the global head; None when it has neither."""
    patches = (normal_patches(cfg, partition_id, num_partitions, "val")
               or normal_patches(cfg, partition_id, num_partitions, "train"))
    if patches is None:
        return None
    settings = head_settings(cfg)
    maps = anomaly_maps(head_for(cfg), global_head, patches.features, cfg.image_size,
                        settings.map_sigma)
    return score_moments(maps, image_scores(maps, settings))
