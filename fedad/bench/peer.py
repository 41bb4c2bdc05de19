"""One peer cell of a sweep: an anomalib image model fit and tested on the images of fedad's
cells, in its own Python process::

    python -m fedad.bench.peer CELL_FOLDER

Reads CELL_FOLDER/cell.json (written by :mod:`fedad.bench.sweep`): the run-config of the data
and split, the number of sites n and ``peer`` (the anomalib model and its options).

- Same split: training images are the normal (label 0) ``train`` images of every site 0..n-1
  of ``prepare_data(cfg, n)`` (what fedad's feature-head sites fit on,
  :func:`fedad.heads.site.normal_patches`), test images the server's test split
  ``samples(-1, "test")``; both read by fedad's AnomalyDataset at the cell's image-size, then
  put through the model's own anomalib pre-processor configured at that size (PatchCore,
  PaDiM: a resize that leaves them as they are, and ImageNet normalisation).
- Same backbone: a model with a timm ``backbone`` is built with ``pre_trained=False`` and
  fedad's packaged ImageNet weights are loaded into its anomalib TimmFeatureExtractor (every
  tensor, or the cell fails). The backbone is the peer option ``backbone`` (lite0/1/2 or their
  timm names), else the cell's feature-source if packaged, else the model's default; one
  without offline weights fails the cell (nothing is downloaded). Its levels are the peer
  option ``layers`` (``layer`` for DFM, FRE), else those at the strides of anomalib's default
  layers on its default backbone (PatchCore's layer2, layer3: strides 8, 16, Lite0's blocks.2,
  blocks.4; PaDiM's layer1-3: strides 4, 8, 16, Lite0's blocks.1, blocks.2, blocks.4). PaDiM
  keeps ``n_features`` = the cell's gaussian-channels random channels (fedad PaDiM's d).
- Fit: anomalib's Engine (Lightning on the CPU, no logger, no checkpoint) with the model's own
  trainer arguments (PatchCore, PaDiM: one pass; the peer option ``max_epochs`` sets the others').
  Test: Engine.predict's raw anomaly maps and image scores (no post-processor) scored by
  :func:`fedad.metrics.anomaly_metrics`, as fedad's cells are.

Writes CELL_FOLDER/summary.json (``seconds``, ``final``: the metrics of fedad's cells plus
``fit_seconds``, ``test_seconds``, ``peak_memory_mb``; the image counts and path digests, the
backbone and the check of its weights) and scores.npz (labels [N], image_scores [N]). A known
failure (anomalib missing, a bad option, a backbone without weights, a missing category) prints
one ``error:`` line and exits 1.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import timm
import torch

from fedad.bench.cost import cell_main, peak_memory_mb
from fedad.bench.spec import PEER_METHOD, peer_model_names
from fedad.config import ConfigError, ExperimentConfig
from fedad.data import AnomalyDataset, DatasetError, Sample
from fedad.experiment import prepare_data
from fedad.heads.settings import HeadSettings
from fedad.metrics import anomaly_metrics
from fedad.models.backbones import PACKAGED, BackboneError, packaged_state_dict
from fedad.seeding import seed_everything

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fedad[peers]' (make install does)"
RUNNER_OPTIONS = frozenset({"max_epochs"})
"""Peer options that are not the model's: the Trainer's epochs (unless the model fixes them)."""
SET_BY_RUNNER = frozenset({"pre_trained", "pre_processor", "post_processor", "evaluator",
                           "visualizer"})
LAYER_OPTIONS = ("layers", "layer")
TIMM_TO_PACKAGED = {weights.timm_name: name for name, weights in PACKAGED.items()}


class PeerError(RuntimeError):
    """A peer cell that cannot run as configured; the message is one line."""


def paths_digest(samples: Sequence[Sample]) -> str:
    """SHA-256 of the samples' image paths, one per line, in order (which images, which
    order)."""
    return hashlib.sha256("\n".join(str(s.image_path) for s in samples).encode()).hexdigest()


def peer_images(cfg: ExperimentConfig, num_clients: int) -> tuple[list[Sample], list[Sample]]:
    """(training, test) samples: the normal ``train`` images of sites 0..n-1, site by site, and
    the server's test split, of ``prepare_data(cfg, num_clients)``."""
    data = prepare_data(cfg, num_clients)
    train = [s for site in range(num_clients) for s in data.samples(site, "train")
             if s.label == 0]
    return train, data.samples(-1, "test")


def _anomalib() -> SimpleNamespace:
    """The anomalib parts a peer uses; PeerError with the install command without anomalib."""
    try:
        from anomalib.callbacks.checkpoint import ModelCheckpoint
        from anomalib.data import ImageBatch, ImageItem
        from anomalib.engine import Engine
        from anomalib.models.components import AnomalibModule, TimmFeatureExtractor
    except ImportError as err:
        raise PeerError(f"peer cells need anomalib ({err}): {INSTALL_HINT}") from err
    return SimpleNamespace(ModelCheckpoint=ModelCheckpoint, ImageBatch=ImageBatch,
                           ImageItem=ImageItem, Engine=Engine, AnomalibModule=AnomalibModule,
                           TimmFeatureExtractor=TimmFeatureExtractor)


def model_class(lib: SimpleNamespace, name: str) -> type:
    """The AnomalibModule class of the anomalib image model ``name`` (its module's name)."""
    try:
        module = importlib.import_module(f"anomalib.models.image.{name}")
    except ModuleNotFoundError as err:
        raise PeerError(f"peer {name}: not an anomalib image model (expected one of "
                        f"{', '.join(peer_model_names() or ())})") from err
    classes = [obj for obj in map(module.__dict__.get, getattr(module, "__all__", ()))
               if isinstance(obj, type) and issubclass(obj, lib.AnomalibModule)]
    if len(classes) != 1:
        raise PeerError(f"peer {name}: anomalib.models.image.{name} exports "
                        f"{len(classes)} models, expected one")
    return classes[0]


@functools.cache
def _levels(timm_name: str) -> dict[str, dict[str, int]]:
    """Feature levels of a timm model, ``{module: {"reduction": stride, "num_chs": C}}``
    (built on the meta device: no weights)."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, features_only=True)
    return {info["module"]: {k: info[k] for k in ("reduction", "num_chs")}
            for info in model.feature_info.info}


def _levels_text(timm_name: str) -> str:
    return ", ".join(f"{m} (stride {v['reduction']})" for m, v in _levels(timm_name).items())


def _backbone(params: dict, options: dict, settings: HeadSettings, peer: str) -> str:
    """The packaged name (lite0/1/2) of the peer's backbone; PeerError for any other."""
    wanted = options.get("backbone") or (settings.feature_source
                                         if settings.feature_source in PACKAGED
                                         else params["backbone"].default)
    packaged = wanted if wanted in PACKAGED else TIMM_TO_PACKAGED.get(wanted)
    if packaged is None:
        raise PeerError(f"peer {peer}: backbone {wanted!r} has no offline ImageNet weights "
                        f"(packaged: {', '.join(PACKAGED)}; nothing is downloaded): set the "
                        "peer's backbone option")
    if "pre_trained" not in params:
        raise PeerError(f"peer {peer}: the model has no pre_trained option, so its backbone "
                        "cannot take fedad's packaged weights")
    return packaged


def _layers(params: dict, options: dict, timm_name: str, peer: str) -> dict[str, Any]:
    """The model's ``layers`` (or ``layer``) option on ``timm_name``: the peer's, checked, or
    the levels at the strides of anomalib's default layers on its default backbone ({} when
    the model takes none, or its default is not layer names)."""
    key = next((k for k in LAYER_OPTIONS if k in params), None)
    if key is None:
        return {}
    levels = _levels(timm_name)
    if key in options:
        given = [options[key]] if isinstance(options[key], str) else list(options[key])
        unknown = [name for name in given if name not in levels]
        if unknown:
            raise PeerError(f"peer {peer}: {key} {unknown}: not levels of {timm_name} "
                            f"({_levels_text(timm_name)})")
        return {key: options[key]}
    default = params[key].default
    names = [default] if isinstance(default, str) else list(default or ())
    if not names or not all(isinstance(name, str) for name in names):
        return {}
    strides = {m: v["reduction"] for m, v in _levels(params["backbone"].default).items()}
    by_stride = {v["reduction"]: m for m, v in levels.items()}
    matched = [by_stride.get(strides.get(name)) for name in names]
    if None in matched:
        raise PeerError(f"peer {peer}: no level of {timm_name} at the strides of anomalib's "
                        f"default {key} {names}: set the peer's {key} option "
                        f"({_levels_text(timm_name)})")
    return {key: matched[0] if isinstance(default, str) else matched}


def build_model(lib: SimpleNamespace, peer: str, options: dict[str, Any],
                cfg: ExperimentConfig) -> tuple[Any, dict[str, Any]]:
    """The anomalib model of ``peer`` with ``options``, its pre-processor at the cell's
    image-size, no post-processor, evaluator or visualizer, fedad's packaged backbone weights
    loaded; and what was chosen (``backbone``: packaged and timm names, the layers, how many
    feature extractors took the weights)."""
    cls = model_class(lib, peer)
    params = dict(inspect.signature(cls.__init__).parameters)
    taken = sorted(set(options) & SET_BY_RUNNER)
    if taken:
        raise PeerError(f"peer {peer}: {', '.join(taken)}: set by the peer runner")
    accepted = (set(params) - {"self", "args", "kwargs"} - SET_BY_RUNNER) | RUNNER_OPTIONS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PeerError(f"peer {peer}: {', '.join(unknown)}: not an option of {cls.__name__} "
                        f"(options: {', '.join(sorted(accepted))})")
    kwargs = {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}
    size = (cfg.image_size, cfg.image_size)
    kwargs.update(pre_processor=cls.configure_pre_processor(image_size=size),
                  post_processor=False, evaluator=False, visualizer=False)
    chosen: dict[str, Any] = {}
    if "backbone" in params:
        settings = cfg.section(HeadSettings)
        packaged = _backbone(params, options, settings, peer)
        timm_name = PACKAGED[packaged].timm_name
        kwargs.update(backbone=timm_name, pre_trained=False,
                      **_layers(params, options, timm_name, peer))
        if peer == "padim" and "n_features" not in options:
            layers = kwargs.get("layers", params["layers"].default)
            channels = sum(_levels(timm_name)[name]["num_chs"] for name in layers)
            kwargs["n_features"] = min(settings.gaussian_channels, channels)
        chosen = {"packaged": packaged, "timm": timm_name,
                  **{k: kwargs[k] for k in (*LAYER_OPTIONS, "n_features") if k in kwargs}}
    model = cls(**kwargs)
    if chosen:
        chosen["extractors_loaded"] = _load_packaged(lib, model, chosen["timm"],
                                                     chosen["packaged"], peer)
    return model, chosen


def _load_packaged(lib: SimpleNamespace, model: torch.nn.Module, timm_name: str,
                   packaged: str, peer: str) -> int:
    """Load fedad's packaged weights into every TimmFeatureExtractor of ``timm_name`` in
    ``model``; how many. PeerError when there is none or one misses a tensor."""
    extractors = [m for m in model.modules()
                  if isinstance(m, lib.TimmFeatureExtractor) and m.backbone == timm_name]
    if not extractors:
        raise PeerError(f"peer {peer}: no anomalib TimmFeatureExtractor of {timm_name} in the "
                        "model to load fedad's packaged weights into")
    for extractor in extractors:
        missing = extractor.feature_extractor.load_state_dict(
            packaged_state_dict(packaged), strict=False).missing_keys
        if missing:
            raise PeerError(f"peer {peer}: packaged {packaged} weights lack {missing[:3]} of "
                            f"the model's {timm_name}")
    return len(extractors)


def weights_check(lib: SimpleNamespace, model: torch.nn.Module, timm_name: str
                  ) -> dict[str, str]:
    """The first tensor of the model's first TimmFeatureExtractor of ``timm_name``: its name
    and :func:`tensor_digest` (a test compares it with the packaged tensor)."""
    extractor = next(m for m in model.modules()
                     if isinstance(m, lib.TimmFeatureExtractor) and m.backbone == timm_name)
    name, tensor = next(iter(extractor.feature_extractor.state_dict().items()))
    return {"tensor": name, "sha256": tensor_digest(tensor)}


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's values as contiguous float32 bytes."""
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


class AnomalibItems(torch.utils.data.Dataset):
    """fedad's AnomalyDataset items as anomalib ImageItems: image [3, S, S] in [0, 1], mask
    [S, S] bool, label, image path."""

    def __init__(self, lib: SimpleNamespace, samples: Sequence[Sample], image_size: int) -> None:
        self.lib = lib
        self.data = AnomalyDataset(samples, image_size, cache=False)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        item = self.data[index]
        return self.lib.ImageItem(image=item["image"], gt_mask=item["mask"][0] > 0.5,
                                  gt_label=item["label"],
                                  image_path=str(self.data.samples[index].image_path))


def _loader(lib: SimpleNamespace, samples: Sequence[Sample], cfg: ExperimentConfig,
            shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        AnomalibItems(lib, samples, cfg.image_size), batch_size=cfg.batch_size,
        shuffle=shuffle, collate_fn=lib.ImageBatch.collate,
        generator=torch.Generator().manual_seed(cfg.seed))


def predictions(batches: Sequence[Any], test: Sequence[Sample], image_size: int
                ) -> tuple[np.ndarray, ...]:
    """(labels [N], image scores [N], masks [N, S, S], maps [N, S, S]) of Engine.predict's
    batches, checked to be the test images in order and maps at the cell's image-size."""
    paths = [path for batch in batches for path in batch.image_path]
    if paths != [str(s.image_path) for s in test]:
        raise PeerError("the predictions are not the test images in order")
    shape = (len(test), image_size, image_size)
    maps = torch.cat([b.anomaly_map.detach().reshape(len(b.image_path), -1) for b in batches])
    if maps.shape[1] != image_size ** 2:
        raise PeerError(f"anomaly maps of {maps.shape[1]} pixels, not {image_size}^2 (the "
                        "cell's image-size)")
    scores = torch.cat([b.pred_score.detach().reshape(-1) for b in batches])
    masks = torch.cat([b.gt_mask.reshape(len(b.image_path), -1) for b in batches])
    labels = np.array([s.label for s in test])
    return (labels, scores.double().numpy(), masks.reshape(shape).numpy().astype(np.float32),
            maps.reshape(shape).double().numpy())


def run_peer(folder: Path) -> dict:
    """Fit and test the peer cell saved in ``folder``; its summary (also summary.json)."""
    started = time.perf_counter()
    record = json.loads((folder / "cell.json").read_text())
    cfg = ExperimentConfig.from_run_config({**record["run_config"], "results-dir": str(folder)})
    peer, options = record["peer"]["model"], record["peer"]["options"]
    seed_everything(cfg.seed)
    lib = _anomalib()
    train, test = peer_images(cfg, record["num_clients"])
    if not train:
        raise PeerError(f"peer {peer}: no normal training images on the {record['num_clients']}"
                        " sites")
    model, backbone = build_model(lib, peer, options, cfg)
    engine = lib.Engine(
        accelerator="cpu", logger=False, default_root_dir=folder / "anomalib",
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[lib.ModelCheckpoint(dirpath=folder / "anomalib", save_top_k=0)],
        **{k: options[k] for k in RUNNER_OPTIONS if k in options})
    log.info("peer %s: fitting on %d normal training images, testing on %d", peer, len(train),
             len(test))
    fit_started = time.perf_counter()
    engine.fit(model, train_dataloaders=_loader(lib, train, cfg, shuffle=True))
    fit_seconds = time.perf_counter() - fit_started
    test_started = time.perf_counter()
    batches = engine.predict(model, dataloaders=_loader(lib, test, cfg, shuffle=False))
    labels, scores, masks, maps = predictions(batches, test, cfg.image_size)
    metrics = anomaly_metrics(labels, scores, masks, maps)
    test_seconds = time.perf_counter() - test_started
    np.savez(folder / "scores.npz", labels=labels, image_scores=scores)
    final = {**metrics, "fit_seconds": round(fit_seconds, 2),
             "test_seconds": round(test_seconds, 2), "peak_memory_mb": peak_memory_mb()}
    summary = {
        "method": PEER_METHOD.format(peer), "peer": peer, "options": options,
        "num_clients": record["num_clients"], "max_epochs": engine.trainer.max_epochs,
        "seconds": round(time.perf_counter() - started, 2),
        "final": {k: v if math.isfinite(v) else None for k, v in final.items()},
        "train_images": len(train), "test_images": len(test),
        "train_digest": paths_digest(train), "test_digest": paths_digest(test),
        "backbone": {**backbone, **({"weights": weights_check(lib, model, backbone["timm"])}
                                    if backbone else {})},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("summary: %s", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: the cell folder; 1 with one ``error:`` line for a known failure (a peer,
    config, dataset or backbone error)."""
    return cell_main(argv, "fedad.bench.peer", run_peer,
                     (PeerError, ConfigError, DatasetError, BackboneError))


if __name__ == "__main__":
    sys.exit(main())
