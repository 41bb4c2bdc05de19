"""A finished run's results folder as ``fedad predict`` and ``fedad export`` read it: its
config, one round's checkpoint, the scorer of that round's global model, the run's decision
thresholds and its test split."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import Sample
from fedad.experiment import resolve_root
from fedad.methods import METHODS
from fedad.predict.scorers import SCORERS, Scorer, build_scorer
from fedad.thresholds import THRESHOLDS_FILE
from partitions import partition_samples, read_manifest
from partitions.manifest import TEST_PARTITION

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A results folder that cannot be scored; the message is one line naming the file."""


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds on a scorer's calibrated outputs: an image is anomalous when its
    score is >= ``image``, a pixel when its map value is >= ``pixel``."""

    image: float = 0.5
    pixel: float = 0.5


@dataclass(frozen=True)
class Run:
    """One round of a finished run.

    Attributes:
        root: the results folder.
        cfg: its config.yaml.
        round: the round of ``checkpoint``.
        checkpoint: the round checkpoint (``state_dict``, ``strategy``, ...).
    """

    root: Path
    cfg: ExperimentConfig
    round: int
    checkpoint: dict


def checkpoint_path(root: Path, server_round: int | None = None) -> Path:
    """``checkpoints/latest.pt``, or ``round-NNN.pt`` of ``server_round``; RunError naming the
    file (and the rounds there are) when it is missing."""
    folder = root / "checkpoints"
    path = folder / ("latest.pt" if server_round is None else f"round-{server_round:03d}.pt")
    if not path.is_file():
        rounds = sorted(int(m.group(1)) for p in folder.glob("round-*.pt")
                        if (m := re.fullmatch(r"round-(\d+)\.pt", p.name)))
        found = f"rounds there: {', '.join(map(str, rounds))}" if rounds else "no checkpoint"
        raise RunError(f"{path}: not found ({found}; is {root} a finished fedad run?)")
    return path


def open_run(results_dir: str | Path, server_round: int | None = None) -> Run:
    """The run in ``results_dir`` at its last round (or ``server_round``), or the last round
    of its method's ``deployed`` stage (:class:`fedad.methods.MethodEntry`); RunError naming
    the missing or unreadable config or checkpoint, or a method without a scorer."""
    root = Path(results_dir).expanduser().resolve()
    config = root / "config.yaml"
    if not config.is_file():
        raise RunError(f"{config}: not found (is {root} a fedad results folder?)")
    try:
        cfg = ExperimentConfig.from_yaml(config)
    except ConfigError as err:
        raise RunError(str(err)) from None
    deployed = METHODS[cfg.method].deployed if cfg.method in METHODS else ""
    if deployed:  # the method's model on the line is a stage's own results folder
        return open_run(root / deployed)
    if cfg.method not in SCORERS:
        raise RunError(f"{config}: method={cfg.method!r} has no scorer (fedad.predict."
                       f"scorers.SCORERS: {', '.join(SCORERS)})")
    path = checkpoint_path(root, server_round)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        raise RunError(f"{path}: unreadable checkpoint ({type(err).__name__})") from None
    return Run(root, cfg, int(checkpoint["round"]), checkpoint)


def load_scorer(run: Run, device: str | None = None) -> Scorer:
    """The scorer of ``run``'s global model (eval mode) on ``device`` (None: the run's own
    ``device`` setting, resolved on this machine); RunError in one line when this machine
    lacks that device, or naming the checkpoint when its state does not fit the config's
    model."""
    try:
        return build_scorer(run.cfg if device is None else run.cfg.replace(device=device),
                            run.checkpoint)
    except ConfigError as err:  # the device (a ValueError too, caught first)
        raise RunError(str(err)) from None
    except (KeyError, ValueError) as err:
        raise RunError(f"{run.root / 'checkpoints'} round {run.round}: the checkpoint does not "
                       f"fit method={run.cfg.method!r} ({err})") from None


def run_thresholds(run: Run) -> Thresholds:
    """The run's decision thresholds on the calibrated scores: its thresholds.json (federated,
    at ``threshold-fpr`` on the sites' held-out normal images: :mod:`fedad.thresholds`); 0.5,
    where every method's calibration puts its threshold, for a run without one (an older run,
    or no site held out normal images) or for another round than the file's, with a log line
    saying so. RunError naming the file when it cannot be read."""
    path = run.root / THRESHOLDS_FILE
    if not path.is_file():
        log.warning("%s: not found (a run before federated thresholds, or without held-out "
                    "normal images): thresholds 0.5", path)
        return Thresholds()
    try:
        saved = json.loads(path.read_text())
        decided = Thresholds(float(saved["image"]["threshold"]),
                             float(saved["pixel"]["threshold"]))
        saved_round = int(saved["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"{path}: unreadable thresholds ({type(err).__name__}: {err})") from None
    if saved_round != run.round:
        log.warning("%s: thresholds of round %d, not of round %d: thresholds 0.5", path,
                    saved_round, run.round)
        return Thresholds()
    return decided


def test_split(run: Run) -> list[Sample]:
    """The run's test split (partitions.csv, under the config's dataset root), in the order of
    its scores.npz."""
    manifest = run.root / "partitions.csv"
    if not manifest.is_file():
        raise RunError(f"{manifest}: not found")
    return partition_samples(read_manifest(manifest), TEST_PARTITION, "test",
                             resolve_root(run.cfg))
