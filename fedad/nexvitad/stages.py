"""How NexViTAD's memory-bank stage (§3.2) is configured, the same way on the server and on
every site: ``method=memorybank`` on ``feature-source=nexvitad`` (the trained encoder, the
decoder removed), fitted on the target category's normal images and evaluated on its test
images, and where a site keeps the encoder between messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedad.config import ExperimentConfig
from fedad.heads.features import NEXVITAD
from fedad.nexvitad.settings import NexViTADSettings


def bank_config(cfg: ExperimentConfig, encoder: Path, results_dir: str = "") -> ExperimentConfig:
    """The memory-bank stage's config: ``cfg``'s data, seed and head settings with the
    encoder file ``encoder`` as the feature source (its ``nexvitad-bank-levels``, no padding,
    one scale: the encoder was trained on whole images), ``target-normals`` and one round;
    every site may be the only one with target images (``min-train-nodes`` 1)."""
    settings = cfg.section(NexViTADSettings)
    extra = {**cfg.extra, "feature-source": NEXVITAD, "feature-pretrained": "file",
             "feature-checkpoint": str(encoder), "feature-layers": settings.nexvitad_bank_levels,
             "feature-padding": 0, "feature-scales": "1", "target-normals": True}
    return cfg.replace(method="memorybank", num_server_rounds=0, min_train_nodes=1,
                       results_dir=results_dir, resume_from="", extra=extra)


def site_encoder_path(cfg: ExperimentConfig, partition_id: int) -> Path:
    """Where a site keeps the trained encoder the server sent (each deployment message starts
    a fresh ClientApp process): ~/.cache/fedad/nexvitad / a digest of the run-config and the
    partition."""
    key = json.dumps({"config": cfg.to_dict(), "partition": partition_id}, sort_keys=True,
                     default=str)
    name = f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"
    return Path.home() / ".cache" / "fedad" / "nexvitad" / name
