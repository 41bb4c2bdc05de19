"""NexViTAD's server workflow (``method=nexvitad``) on the :class:`fedad.server_run.ServerRun`
skeleton, in two stages:

1. Training (§3.1): the registry's strategy trains adapters, projections and heads for
   ``num-server-rounds`` rounds (:func:`fedad.federation.train_global_model`); each site
   replies only what it trained and :class:`fedad.nexvitad.aggregation.SiteKeyGuard` averages
   the site-specific heads over the sites that trained them. Every round's row holds the
   decoder's metrics on the whole test split and, as ``target_*``, on the target category's
   (the paper's "original decoder"). The trained encoder is written to
   ``checkpoints/encoder.pt`` and sent to every site (:data:`fedad.nexvitad.protocol.ENCODER`,
   audited; a site that cannot keep it stops the run).
2. Inference (§3.2): the decoder removed, the federated Sinkhorn K-means memory bank
   (:func:`fedad.heads.workflow.run_feature_head`) on the trained encoder's features, fitted on
   the target category's normal images at the site that holds them (prototypes and counts
   cross, never features or images) and evaluated on the target's test images; its results
   folder is ``bank/`` (thresholds, scores and plots there). The run's summary holds the
   bank's metrics as its final ones, the decoder's as ``decoder_*`` (whole test split) and
``target_*`` (target category).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedad.config import ConfigError, ExperimentConfig
from fedad.federation import RoundMetrics, train_global_model
from fedad.heads.workflow import run_feature_head
from fedad.metrics import METRIC_NAMES, anomaly_metrics
from fedad.models import load_trainable_state_dict
from fedad.nexvitad.aggregation import SiteKeyGuard
from fedad.nexvitad.model import encoder_state, write_encoder
from fedad.nexvitad.protocol import BANK_DIR, ENCODER, ENCODER_FILE, ENCODER_RECORD
from fedad.nexvitad.stages import bank_config
from fedad.nexvitad.training import build_nexvitad, predict_nexvitad, run_categories
from fedad.server_run import ServerRun
from strategies import build_strategy
from strategies.registry import FED_MSVT_STRATEGIES

log = logging.getLogger(__name__)


def target_metrics(run: ServerRun, target: str) -> RoundMetrics:
    """The round-metrics callback: the decoder's metrics on the target's test images, as
    ``target_<metric>``."""
    samples = [s for s in run.test_samples() if s.category == target]

    def metrics(model: nn.Module) -> dict[str, float]:
        p = predict_nexvitad(model, samples, run.cfg, run.data.defect_types)
        return {f"target_{k}": v for k, v in
                anomaly_metrics(p.labels, p.image_scores, p.masks, p.maps).items()}

    return metrics


def run_nexvitad(grid: Grid, cfg: ExperimentConfig) -> dict:
    """Both NexViTAD stages for ``cfg``; writes the results folder and returns the summary.
    ConfigError for a strategy with CFA (it aligns MSVT embeddings, which NexViTAD has not)."""
    if "cfa" in FED_MSVT_STRATEGIES.get(cfg.strategy, ()):
        raise ConfigError(f"strategy={cfg.strategy!r}: CFA aligns MSVT embeddings, which "
                          "method=nexvitad has not; use aca or a Flower strategy")
    _, target = run_categories(cfg)
    run = ServerRun(grid, cfg)
    train_global_model(run, target_metrics(run, target),
                       SiteKeyGuard.around(build_strategy(cfg)))
    _, state, _ = run.results.load_latest()
    model = build_nexvitad(cfg)
    load_trainable_state_dict(model, state)
    encoder = encoder_state(model)
    path = write_encoder(model.settings, encoder, run.results.checkpoints / ENCODER_FILE)
    run.query_sites(ENCODER, RecordDict({ENCODER_RECORD: ArrayRecord(encoder)}))
    log.info("nexvitad: encoder trained (%s); memory bank on target %r", path, target)
    bank = run_feature_head(grid, bank_config(cfg, path, str(run.root / BANK_DIR)))
    last = run.results.rows[-1]
    decoder = {f"decoder_{k}": last[k] for k in METRIC_NAMES if k in last}
    final = {**decoder, **{k: v for k, v in bank["final"].items() if k != "round"}}
    return run.finish({"bank": {"results_dir": bank["results_dir"],
                                "thresholds": bank.get("thresholds", {})}}, final)
