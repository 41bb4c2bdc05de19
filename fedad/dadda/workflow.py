"""D-ADDA's server workflow (``method=dadda``) over Flower messages:

1. ``query.dadda_upload``: every site runs DAM and sends its eq. (3) payload; the server parses,
   checks and audits each one (:func:`fedad.dadda.payload.receive_upload`, RESULTS_DIR/
   privacy_audit.jsonl) before any use; refused payloads are left out and logged. With
   ``dadda-synthesis=dam-only`` the sites run DAM and send nothing (no server models needed).
2. Stage 2 (``dadda-synthesis=dadda``): G^I (unconditional DDPM) on the accepted normal images,
   G^M (class-conditional DDPM, classifier-free guidance) on the accepted masks.
3. ``query.dadda_synthesize`` with the G^I / G^M weights: each site fine-tunes G^I with the mask
   cross-attention, synthesizes pairs and caches them (each site writes its own preview grid,
   synthesized_partition<i>.png, into the folder the server names; on one machine that is the
   results folder, in a deployment the site's own disk).
4. FedAvg of the classifier + localizer with :func:`fedad.federation.run_federated`, then the
   per-round defect-type accuracy (U-Pro / F-Pro) and the Table II / III files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedad.config import ExperimentConfig
from fedad.dadda.detector import build_detector, defect_types_of
from fedad.dadda.diffusion import train_diffusion
from fedad.dadda.payload import PrivacyAudit, ServerUpload, receive_upload
from fedad.dadda.settings import DADDASettings
from fedad.dadda.tables import accuracy_per_round, write_tables
from fedad.experiment import prepare_data
from fedad.federation import run_federated, wait_for_nodes
from fedad.models.diffusion_unet import DiffusionUNet
from fedad.seeding import seed_everything

log = logging.getLogger(__name__)

CACHED = "query.dadda_cached"
UPLOAD = "query.dadda_upload"
SYNTHESIZE = "query.dadda_synthesize"


def _broadcast(grid: Grid, nodes: list[int], message_type: str, content: RecordDict,
               cfg: ExperimentConfig) -> list[Message]:
    """Send ``content`` to every node; the replies sorted by node id."""
    messages = [Message(RecordDict(dict(content.items())), dst_node_id=node,
                        message_type=message_type) for node in nodes]
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    return sorted(replies, key=lambda m: m.metadata.src_node_id)


def sites_hold_pairs(grid: Grid, nodes: list[int], cfg: ExperimentConfig) -> bool:
    """True when every site already holds synthetic pairs for ``cfg``'s synthesis settings
    (a previous run that differed only in the detector or the federated stage)."""
    replies = _broadcast(grid, nodes, CACHED, RecordDict(), cfg)
    return all(not r.has_error() and int(r.content["metrics"]["cached"]) == 1 for r in replies)


def run_dam_only(grid: Grid, nodes: list[int], cfg: ExperimentConfig) -> None:
    """Stage 1 without a payload (``dadda-synthesis=dam-only`` needs no server models): every
    site runs DAM and caches its pairs (RuntimeError naming the nodes that failed)."""
    content = RecordDict({"config": ConfigRecord({"send-upload": False})})
    failed = [f"node {r.metadata.src_node_id}: {r.error.reason}"
              for r in _broadcast(grid, nodes, UPLOAD, content, cfg) if r.has_error()]
    if failed:
        raise RuntimeError("stage 1 (DAM) failed on " + "; ".join(failed))


def collect_uploads(grid: Grid, nodes: list[int], cfg: ExperimentConfig, audit: PrivacyAudit,
                    num_classes: int) -> list[ServerUpload]:
    """Stage 1: the accepted uploads (refused or failed ones are audited, logged, left out)."""
    accepted = []
    content = RecordDict({"config": ConfigRecord({"send-upload": True})})
    for reply in _broadcast(grid, nodes, UPLOAD, content, cfg):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.error("node %s: no upload (site error: %s)", node, reply.error.reason)
            audit.record(node=node, kind="upload", upload=None, accepted=False,
                         reason=f"site error: {reply.error.reason}")
            continue
        upload = receive_upload(reply.content, node=node, audit=audit, num_classes=num_classes)
        if upload is not None:
            accepted.append(upload)
    log.info("stage 1: %d of %d uploads accepted", len(accepted), len(nodes))
    return accepted


def train_generators(uploads: list[ServerUpload], settings: DADDASettings, num_types: int,
                     seed: int) -> tuple[DiffusionUNet, DiffusionUNet, dict[str, float]]:
    """Stage 2: G^I on the uploads' normal images, G^M on their masks by defect class.

    Returns the EMA models and statistics (sizes, losses, seconds)."""
    images = np.concatenate([u.normal_images for u in uploads])
    masks = np.concatenate([u.masks for u in uploads])
    classes = np.concatenate([u.mask_classes for u in uploads]) - 1  # 0 is "good"
    size = settings.dadda_diffusion_size
    if not len(images) or not len(masks):
        raise RuntimeError(f"stage 2: accepted uploads hold {len(images)} normal images and "
                           f"{len(masks)} masks; both models need at least one")
    if images.shape[2:] != (size, size) or masks.shape[1:] != (size, size):
        raise RuntimeError(f"stage 2: uploads of {images.shape[2:]} / {masks.shape[1:]} px, "
                           f"dadda-diffusion-size={size}")
    image_model, image_stats = train_diffusion(
        DiffusionUNet(**settings.unet_kwargs(3)), torch.from_numpy(images) * 2 - 1,
        settings=settings, iterations=settings.dadda_train_iterations, seed=seed, name="G^I")
    mask_model, mask_stats = train_diffusion(
        DiffusionUNet(**settings.unet_kwargs(1, num_classes=num_types)),
        torch.from_numpy(masks).float()[:, None] * 2 - 1, settings=settings,
        iterations=settings.dadda_train_iterations, seed=seed + 1,
        classes=torch.from_numpy(classes), name="G^M")
    stats = {"normal_images": len(images), "masks": len(masks),
             "image_model_loss": image_stats["loss"], "mask_model_loss": mask_stats["loss"],
             "image_model_seconds": image_stats["seconds"],
             "mask_model_seconds": mask_stats["seconds"]}
    log.info("stage 2: %s", stats)
    return image_model, mask_model, stats


def synthesize_on_sites(grid: Grid, nodes: list[int], cfg: ExperimentConfig,
                        models: RecordDict, preview_dir: Path) -> pd.DataFrame:
    """Stage 3 on every site; a table of the sites' counts and timings (RuntimeError naming
    the nodes whose synthesis failed: they could not train the detector)."""
    models["config"] = ConfigRecord({"preview-dir": str(preview_dir)})
    rows, failed = [], []
    for reply in _broadcast(grid, nodes, SYNTHESIZE, models, cfg):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed.append(f"node {node}: {reply.error.reason}")
            continue
        rows.append({"node": node, **dict(reply.content["metrics"])})
    if failed:
        raise RuntimeError("stage 3 failed on " + "; ".join(failed))
    return pd.DataFrame(rows)


def generate_pairs(grid: Grid, nodes: list[int], cfg: ExperimentConfig,
                   upload_classes: int, root: Path, seconds: dict[str, float]
                   ) -> tuple[list[ServerUpload], dict[str, float]]:
    """Stages 1-3 (DAM and uploads, the server's generators, synthesis on the sites); stage
    times go into ``seconds``; ``upload_classes`` is the number of mask classes an upload may
    carry ("good" included). Returns the accepted uploads and the generators' statistics."""
    settings = cfg.section(DADDASettings)
    start = time.perf_counter()
    uploads: list[ServerUpload] = []
    models = RecordDict()
    generator_stats: dict[str, float] = {}
    if settings.dadda_synthesis == "dam-only":
        run_dam_only(grid, nodes, cfg)
        seconds["stage1_dam"] = time.perf_counter() - start
    else:
        uploads = collect_uploads(grid, nodes, cfg, PrivacyAudit(root / "privacy_audit.jsonl"),
                                  upload_classes)
        seconds["stage1_dam_upload"] = time.perf_counter() - start
        if not uploads:
            raise RuntimeError("stage 2: every upload was refused (see privacy_audit.jsonl)")
        start = time.perf_counter()
        image_model, mask_model, generator_stats = train_generators(
            uploads, settings, len(defect_types_of(cfg)), cfg.seed)
        models["image-model"] = ArrayRecord(image_model.state_dict())
        models["mask-model"] = ArrayRecord(mask_model.state_dict())
        seconds["stage2_generators"] = time.perf_counter() - start
    start = time.perf_counter()
    sites = synthesize_on_sites(grid, nodes, cfg, models, root)
    sites.to_csv(root / "synthesis.csv", index=False)
    seconds["stage3_synthesis"] = time.perf_counter() - start
    return uploads, generator_stats


def run_dadda(grid: Grid, cfg: ExperimentConfig) -> dict:
    """All D-ADDA stages for ``cfg``; writes the results folder and returns the summary."""
    settings = cfg.section(DADDASettings)
    root = cfg.resolved_results_dir()
    cfg = cfg.replace(results_dir=str(root))  # one folder for every stage
    root.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    nodes = sorted(wait_for_nodes(grid, cfg.min_train_nodes))
    data = prepare_data(cfg, len(nodes))
    seconds: dict[str, float] = {}

    uploads: list[ServerUpload] = []
    generator_stats: dict[str, float] = {}
    start = time.perf_counter()
    if settings.dadda_reuse_cache and sites_hold_pairs(grid, nodes, cfg):
        log.info("stages 1-3 skipped: every site holds synthetic pairs for these synthesis "
                 "settings (dadda-reuse-cache=false regenerates them)")
        seconds["stages1_3_reused"] = time.perf_counter() - start
    else:
        uploads, generator_stats = generate_pairs(grid, nodes, cfg, len(data.defect_types),
                                                  root, seconds)

    start = time.perf_counter()
    summary = run_federated(grid, cfg)
    seconds["stage4_federated"] = time.perf_counter() - start
    test = data.samples(-1, "test")
    rounds = accuracy_per_round(root, build_detector(cfg), test, cfg)
    protocol = write_tables(root, cfg, settings.dadda_synthesis, len(nodes), rounds)
    pd.DataFrame([{"stage": k, "seconds": round(v, 2)} for k, v in seconds.items()]).to_csv(
        root / "stages.csv", index=False)
    log.info("D-ADDA stages (s): %s | class accuracy U-Pro %.3f F-Pro %.3f", seconds,
             protocol["u_pro"], protocol["f_pro"])
    return {**summary, "stage_seconds": seconds, "generators": generator_stats,
            "uploads_accepted": len(uploads), "class_accuracy": protocol}
