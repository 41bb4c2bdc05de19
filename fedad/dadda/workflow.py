"""D-ADDA's server workflow (``method=dadda``) on the :class:`fedad.server_run.ServerRun`
skeleton:

1-2. :class:`strategies.dadda.DADDAUploadStrategy` behind the reply guard: every site runs DAM
   and sends its eq. (3) payload; the guard refuses, logs and audits what breaks the rule;
   G^I (unconditional DDPM) is trained on the accepted normal images and G^M (class-conditional
   DDPM, classifier-free guidance) on the accepted masks. The generators and the strategy's
   state are a stage checkpoint: a resumed run does not train them again. With
   ``dadda-synthesis=dam-only`` the sites run DAM and send nothing (no server models needed).
3. :data:`fedad.dadda.protocol.SYNTHESIZE` with the generators: each site fine-tunes G^I with the
   mask cross-attention, synthesizes pairs and caches them (each site writes its preview grid,
   synthesized_partition<i>.png, into the folder the server names; on one machine that is the
   results folder, in a deployment the site's own disk). Skipped when every site already holds
   pairs for these synthesis settings (``dadda-reuse-cache``).
4. The registry's federated strategy for the classifier + localizer
   (:func:`fedad.federation.train_global_model`), with the defect-type accuracy of every
   round's global model in rounds.csv; then the Table II / III files and summary.json, once.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedad.config import ExperimentConfig
from fedad.dadda.detector import build_detector, defect_types_of
from fedad.dadda.protocol import CACHED, GENERATORS, PREVIEW_DIR, SEND_UPLOAD, SYNTHESIZE, UPLOAD
from fedad.dadda.settings import DADDASettings
from fedad.dadda.tables import class_accuracy_metrics, write_tables
from fedad.device import device_of
from fedad.federation import train_global_model
from fedad.server_run import ServerRun
from strategies.dadda import DADDAUploadStrategy
from strategies.guard import GuardedStrategy

log = logging.getLogger(__name__)


def sites_hold_pairs(run: ServerRun) -> bool:
    """True when every site already holds synthetic pairs for the run's synthesis settings
    (a previous run that differed only in the detector or the federated stage)."""
    rows = run.query_sites(CACHED, RecordDict(), required=False)
    return len(rows) == len(run.nodes) and all(int(r["cached"]) == 1 for r in rows)


def upload_stage(run: ServerRun) -> tuple[DADDAUploadStrategy, ArrayRecord | None]:
    """The stages 1-2 strategy, and the generators when a resumed run finished stage 2 (its
    stage checkpoint restores the strategy's state too); None otherwise."""
    strategy = DADDAUploadStrategy(run.cfg.section(DADDASettings), len(defect_types_of(run.cfg)),
                                   len(run.data.defect_types), run.cfg.seed,
                                   device_of(run.cfg), run.cfg.precision)
    saved = run.load_stage(GENERATORS)
    if saved is None:
        return strategy, None
    strategy.load_state_dict(saved["strategy"])
    return strategy, ArrayRecord(saved["arrays"])


def train_generators_on_uploads(run: ServerRun, strategy: DADDAUploadStrategy) -> ArrayRecord:
    """Stages 1-2: ``strategy`` behind the reply guard for one round; the generators, saved as
    the stage checkpoint."""
    guarded = GuardedStrategy(strategy, min_replies=1)
    guarded.audit = run.audit
    result = guarded.start(grid=run.grid, initial_arrays=ArrayRecord(), num_rounds=1,
                           timeout=run.cfg.round_timeout)
    if not result.arrays.keys():
        raise RuntimeError(f"stage 2: every upload was refused (see {run.audit.path})")
    run.save_stage(GENERATORS, {"arrays": result.arrays.to_torch_state_dict(),
                                "strategy": strategy.state_dict()})
    return result.arrays


def generate_pairs(run: ServerRun, strategy: DADDAUploadStrategy | None,
                   generators: ArrayRecord | None, seconds: dict[str, float]) -> None:
    """Stages 1-3 (DAM and uploads, the server's generators unless ``generators`` were
    restored, synthesis on the sites); stage times go into ``seconds``. ``strategy`` is None
    for ``dam-only``."""
    start = time.perf_counter()
    content = RecordDict()
    if strategy is None:
        run.query_sites(UPLOAD, RecordDict({"config": ConfigRecord({SEND_UPLOAD: False})}))
        seconds["stage1_dam"] = time.perf_counter() - start
    elif generators is not None:
        content[GENERATORS] = generators
    else:
        content[GENERATORS] = train_generators_on_uploads(run, strategy)
        training = (strategy.generator_stats["image_model_seconds"]
                    + strategy.generator_stats["mask_model_seconds"])
        seconds["stage1_dam_upload"] = time.perf_counter() - start - training
        seconds["stage2_generators"] = training
    start = time.perf_counter()
    content["config"] = ConfigRecord({PREVIEW_DIR: str(run.root)})
    pd.DataFrame(run.query_sites(SYNTHESIZE, content)).to_csv(run.root / "synthesis.csv",
                                                          index=False)
    seconds["stage3_synthesis"] = time.perf_counter() - start


def run_dadda(grid: Grid, cfg: ExperimentConfig) -> dict:
    """All D-ADDA stages for ``cfg``; writes the results folder and returns the summary."""
    settings = cfg.section(DADDASettings)
    run = ServerRun(grid, cfg)
    seconds: dict[str, float] = {}
    strategy, generators = (None, None) if settings.dadda_synthesis == "dam-only" \
        else upload_stage(run)
    start = time.perf_counter()
    if settings.dadda_reuse_cache and sites_hold_pairs(run):
        log.info("stages 1-3 skipped: every site holds synthetic pairs for these synthesis "
                 "settings (dadda-reuse-cache=false regenerates them)")
        seconds["stages1_3_reused"] = time.perf_counter() - start
    else:
        generate_pairs(run, strategy, generators, seconds)

    start = time.perf_counter()
    train_global_model(run, class_accuracy_metrics(build_detector(cfg), run.test_samples(), cfg))
    seconds["stage4_federated"] = time.perf_counter() - start
    final = write_tables(run.root, cfg, settings.dadda_synthesis, len(run.nodes),
                         pd.read_csv(run.root / "rounds.csv"))
    pd.DataFrame([{"stage": k, "seconds": round(v, 2)} for k, v in seconds.items()]).to_csv(
        run.root / "stages.csv", index=False)
    log.info("D-ADDA stages (s): %s | class accuracy U-Pro %.3f F-Pro %.3f", seconds,
             final["class_accuracy_u_pro"], final["class_accuracy"])
    return run.finish({
        "stage_seconds": seconds,
        "generators": strategy.generator_stats if strategy else {},
        "uploads_accepted": strategy.accepted if strategy else 0}, final)
