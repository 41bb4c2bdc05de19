"""Run a sweep's cells, as real Flower simulations or on the in-process grid, resumably.

Folder layout of a sweep ``OUT`` (the same for both runners)::

    OUT/sweep.yaml                 the sweep file as run
    OUT/cells/<cell>/cell.json     what the cell is (params, run-config, clients)
    OUT/cells/<cell>/...           the run's results folder (summary.json when it finished)
    OUT/cells/<cell>/cost.json     peak memory and seconds of an in-process cell's process
    OUT/cells/<cell>/flwr.log      the run's log (`flwr run --stream`, or the cell process's)
    OUT/cells/<cell>/error.json    status, error and log tail of a failed cell
    OUT/cells/<cell>/running       present while the cell's run has not returned

:func:`cell_status` is the one finished-run rule, used by the sweep, its resumption and the
report: a cell whose folder holds summary.json, no ``running`` marker and no error.json is
finished and skipped on a rerun (a run killed after writing summary.json, e.g. between
D-ADDA's federated stage and its accuracy tables, is not finished); a failed cell is recorded
and retried on the next run; the sweep goes on after a failure. A run that completed although a
site raised counts as failed (its rounds trained on fewer sites than asked). Peer cells
(:mod:`fedad.bench.peer`) always run in a process of their own, whatever the sweep's runner.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from fedad.bench.spec import PEER, PROJECT_ROOT, Cell, SweepError, SweepSpec
from fedad.config import ConfigError, ExperimentConfig
from fedad.simulation import SimulationRun, run_simulation

LOG_TAIL_CHARS = 4000
CLIENT_ERROR_MARKER = "An exception was raised when processing a message"
CLIENT_ERROR = re.compile(rf"{CLIENT_ERROR_MARKER}|partition \d+ failed: Traceback")
"""A site's exception in a log: Flower's message, or fedad.inprocess.InProcessGrid's."""
CELLS = "cells"
RUNNING_MARKER = "running"
COMPLETED = "finished:completed"
PROCESS_ERROR = re.compile(r"^error: (.+)$", re.MULTILINE)
"""The one-line error a cell process (e.g. fedad.bench.peer) prints before it exits 1."""

CellRunner = Callable[[Cell, Path, SweepSpec, Path], SimulationRun]
"""(cell, its results folder, the sweep, FLWR_HOME) -> how its simulation ended."""


@dataclass(frozen=True)
class CellOutcome:
    """What happened to one cell in this invocation: ``done``, ``skipped`` or ``failed``."""

    cell: Cell
    status: str
    seconds: float = 0.0
    error: str = ""


def simulate_cell(cell: Cell, folder: Path, spec: SweepSpec, flwr_home: Path) -> SimulationRun:
    """The cell as a real `flwr run` simulation (Ray backend) writing into ``folder``."""
    return run_simulation(
        PROJECT_ROOT, num_supernodes=cell.num_clients,
        run_config={**cell.run_config, "results-dir": str(folder)},
        flwr_home=flwr_home, cpus_per_client=spec.cpus_per_client, timeout=spec.cell_timeout,
    )


def in_process_cell(cell: Cell, folder: Path, spec: SweepSpec,
                    flwr_home: Path) -> SimulationRun:
    """The cell on the in-process grid, in a fresh Python process (``python -m
    fedad.bench.cell FOLDER``) writing into ``folder``: cells stay independent of each other
    and of their order (global RNGs, torch threads, caches), ``cell-timeout`` can stop one and
    a crash takes only its cell down."""
    return cell_process("fedad.bench.cell", folder, spec.cell_timeout)


def peer_cell(cell: Cell, folder: Path, spec: SweepSpec, flwr_home: Path) -> SimulationRun:
    """A peer cell: the anomalib model in a fresh Python process (``python -m
    fedad.bench.peer FOLDER``) writing into ``folder``."""
    return cell_process("fedad.bench.peer", folder, spec.cell_timeout)


def cell_process(module: str, folder: Path, timeout: float) -> SimulationRun:
    """Run ``python -m MODULE FOLDER`` (stdout and stderr as its log) for at most ``timeout``
    seconds; completed when it exits 0."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", module, str(folder)],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
        status = COMPLETED if done.returncode == 0 else f"failed (exit {done.returncode})"
        log = done.stdout
    except subprocess.TimeoutExpired as err:
        status, log = f"timeout after {timeout:g} s", err.stdout or b""
    return SimulationRun(None, status, log.decode(errors="replace"), time.perf_counter() - start)


RUNNERS: dict[str, CellRunner] = {"flwr": simulate_cell, "in-process": in_process_cell}
"""The cell runner of each ``runner`` value of a sweep file (peer cells: :func:`peer_cell`)."""


def cell_folder(out: Path, cell: Cell) -> Path:
    """Results folder of ``cell`` in the sweep folder ``out``."""
    return out / CELLS / cell.name


def cell_status(folder: Path) -> str:
    """``done`` (summary.json, no running marker, no error.json), ``failed`` (error.json),
    ``incomplete`` (started, not returned: running or killed) or ``pending`` (no folder)."""
    if (folder / "error.json").is_file():
        return "failed"
    if (folder / RUNNING_MARKER).exists():
        return "incomplete"
    if (folder / "summary.json").is_file():
        return "done"
    return "incomplete" if folder.is_dir() else "pending"


def is_finished(folder: Path) -> bool:
    """True when the cell in ``folder`` is finished (:func:`cell_status` ``done``)."""
    return cell_status(folder) == "done"


def run_sweep(
    spec: SweepSpec, out: str | Path, *, max_cells: int | None = None,
    runner: CellRunner | None = None, progress: bool = True,
) -> list[CellOutcome]:
    """Run every unfinished cell of ``spec`` into ``out`` (see the module docstring).

    Args:
        max_cells: stop after running this many cells (finished cells skipped do not count).
        runner: how a fedad cell is run (default: the one ``spec.runner`` names; tests may
            pass another); peer cells always run by :func:`peer_cell`.
        progress: show a progress bar with elapsed time and ETA on stderr.

    Returns:
        one outcome per cell finished before or run now, in sweep order.
    """
    out = Path(out).expanduser().resolve()
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False,
                                                   allow_unicode=True))
    flwr_home = out / ".flwr-home"
    runner = runner or RUNNERS[spec.runner]
    outcomes: dict[str, CellOutcome] = {}
    pending = []
    for cell in spec.cells():
        if is_finished(cell_folder(out, cell)):
            _check_same_cell(cell, cell_folder(out, cell))
            outcomes[cell.name] = CellOutcome(cell, "skipped")
        else:
            pending.append(cell)
    if outcomes and progress:
        print(f"{spec.name}: {len(outcomes)} finished cells kept, {len(pending)} to run",
              file=sys.stderr, flush=True)
    pending = pending[:max_cells] if max_cells is not None else pending
    bar = tqdm(pending, desc=spec.name, unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        last = _run_cell(cell, cell_folder(out, cell), spec, flwr_home,
                         peer_cell if cell.kind == PEER else runner)
        outcomes[cell.name] = last
        if progress:
            bar.write(f"{last.status:6s} {cell.name} ({last.seconds:.0f} s)"
                      + (f": {last.error.splitlines()[0]}" if last.error else ""))
    bar.close()
    return [outcomes[c.name] for c in spec.cells() if c.name in outcomes]


def _run_cell(cell: Cell, folder: Path, spec: SweepSpec, flwr_home: Path,
              runner: CellRunner) -> CellOutcome:
    """Run one cell; a failure is written to error.json and returned, never raised."""
    if folder.exists():
        shutil.rmtree(folder)  # a failed or interrupted attempt: start the cell afresh
    folder.mkdir(parents=True)
    _write_json(folder / "cell.json", cell_record(cell))
    (folder / RUNNING_MARKER).touch()  # removed only when the runner returns, not if killed
    start = time.perf_counter()
    try:
        ExperimentConfig.from_run_config({**cell.run_config, "results-dir": str(folder)})
        run = runner(cell, folder, spec, flwr_home)
    except (ConfigError, ValueError, OSError) as err:
        return _failed(cell, folder, "not started", f"{type(err).__name__}: {err}", "",
                       time.perf_counter() - start)
    (folder / RUNNING_MARKER).unlink()
    (folder / "flwr.log").write_text(run.log)
    if not run.completed:
        said = PROCESS_ERROR.findall(run.log)
        return _failed(cell, folder, run.status, f"the run ended with status {run.status}"
                       + (f": {said[-1]}" if said else ""), run.log, run.seconds)
    if not is_finished(folder):
        return _failed(cell, folder, run.status, "run completed without writing summary.json",
                       run.log, run.seconds)
    client_error = first_client_error(run.log)
    if client_error:
        (folder / "summary.json").unlink()  # not a result of the configured experiment
        return _failed(cell, folder, run.status, f"a site raised: {client_error}",
                       run.log, run.seconds)
    return CellOutcome(cell, "done", run.seconds)


def first_client_error(log: str) -> str:
    """The first exception a site raised in a run's log ("" when none).

    A run whose sites raised still ends "completed" (the strategy skips rounds without usable
    replies), but its metrics then describe an untrained or partly trained model.
    """
    marker = CLIENT_ERROR.search(log)
    if marker is None:
        return ""
    match = re.search(r"\b([\w.]*(?:Error|Exception)): (.+)", log[marker.start():])
    return f"{match.group(1)}: {match.group(2).strip()}" if match else marker.group(0)


def _failed(cell: Cell, folder: Path, status: str, error: str, log: str,
            seconds: float) -> CellOutcome:
    (folder / RUNNING_MARKER).unlink(missing_ok=True)  # ended, if only by failing to start
    _write_json(folder / "error.json", {"status": status, "error": error,
                                        "log_tail": log[-LOG_TAIL_CHARS:]})
    return CellOutcome(cell, "failed", seconds, error)


def cell_record(cell: Cell) -> dict[str, Any]:
    """The JSON form of a cell saved in its folder (what the tables read back; ``peer`` only
    for a peer cell)."""
    record = {"name": cell.name, "kind": cell.kind, "params": cell.params,
              "run_config": cell.run_config, "num_clients": cell.num_clients}
    return {**record, "peer": cell.peer} if cell.peer else record


def _check_same_cell(cell: Cell, folder: Path) -> None:
    """A finished cell is reused only if it ran the same run-config (and peer options)."""
    saved = json.loads((folder / "cell.json").read_text()) if (folder / "cell.json").is_file() \
        else {}
    for key, label, now in (("run_config", "run-config", cell.run_config),
                            ("peer", "peer model or options", cell.peer or None)):
        if saved.get(key) != json.loads(json.dumps(now)):
            raise SweepError(
                f"{folder}: finished with a different {label} than the sweep file now gives "
                f"({saved.get(key)} vs {now}); use another output folder")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))
