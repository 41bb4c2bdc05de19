"""Run the app as a real Flower simulation (`flwr run`, Ray backend) and check how it ended.

`flwr run --stream` exits 0 even when the run failed, and leaves a local SuperLink running on
fixed ports; this module reads the final status with `flwr ls` and stops that SuperLink.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


@dataclass(frozen=True)
class SimulationRun:
    """How one `flwr run` ended."""

    run_id: int | None
    status: str  # e.g. "finished:completed", "finished:failed", "unknown"
    log: str
    seconds: float

    @property
    def completed(self) -> bool:
        """True when the run finished with status completed."""
        return self.status == "finished:completed"


def format_run_config(values: Mapping[str, Any]) -> str:
    """``{"num-server-rounds": 2, "method": "msvt"}`` -> ``num-server-rounds=2 method='msvt'``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = "'" + str(value).replace("'", "") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def flwr_executable() -> str:
    """The `flwr` CLI next to this Python interpreter (or on PATH)."""
    local = Path(sys.executable).with_name("flwr")
    found = str(local) if local.exists() else shutil.which("flwr")
    if not found:
        raise FileNotFoundError("flwr CLI not found: install flwr[simulation]==1.41.0")
    return found


def federation_config(num_supernodes: int, cpus_per_client: int = 1,
                      gpus_per_client: float = 0.0) -> str:
    """The ``--federation-config`` text of a local simulation: ``num_supernodes`` sites, each
    ClientApp reserving ``cpus_per_client`` cores (its torch threads: fedad.device) and
    ``gpus_per_client`` of a GPU (fractional: 0.25 lets four sites share one GPU at a time;
    0 reserves none). ValueError for a count out of range."""
    if num_supernodes < 1 or cpus_per_client < 1 or not gpus_per_client >= 0:
        raise ValueError(f"num-supernodes={num_supernodes}, client-resources-num-cpus="
                         f"{cpus_per_client}, client-resources-num-gpus={gpus_per_client}: "
                         "need >= 1, >= 1 and >= 0")
    text = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    return text + (f" client-resources-num-gpus={gpus_per_client:g}" if gpus_per_client else "")


def run_simulation(
    app_dir: str | Path,
    *,
    num_supernodes: int,
    run_config: Mapping[str, Any] | str,
    flwr_home: str | Path,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    timeout: float = 3600.0,
    echo: bool = False,
) -> SimulationRun:
    """`flwr run APP --stream` with ``num_supernodes`` simulated sites; returns its final status.

    Args:
        app_dir: the Flower App (this project's root).
        cpus_per_client, gpus_per_client: each ClientApp's Ray resources
            (:func:`federation_config`).
        run_config: run-config overrides (keys must exist in pyproject.toml), as a mapping or
            as the text `flwr run --run-config` takes.
        flwr_home: FLWR_HOME for this run (config, SuperLink state, logs).
        echo: also print the streamed log as it arrives.
    """
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(Path(flwr_home).resolve())}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    command = [
        flwr_executable(), "run", str(app_dir),
        "--federation-config", federation_config(num_supernodes, cpus_per_client, gpus_per_client),
        "--stream",
    ]
    if run_config:
        text = run_config if isinstance(run_config, str) else format_run_config(run_config)
        command += ["--run-config", text]
    lines: list[str] = []
    with simulation_lock(echo=echo), contextlib.ExitStack() as cleanup:
        start = time.perf_counter()
        cleanup.callback(stop_local_superlink, flwr_home)
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)
                if time.perf_counter() - start > timeout:
                    proc.kill()
                    lines.append(f"fedad: flwr run killed after {timeout:.0f} s\n")
                    break
        log = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", log)
        run_id = int(match.group(1)) if match else None
        status = run_status(run_id, env) if run_id is not None else "unknown"
    return SimulationRun(run_id, status, "".join(lines), time.perf_counter() - start)


@contextlib.contextmanager
def simulation_lock(echo: bool = False) -> Iterator[None]:
    """Hold the machine-wide lock of local simulations (the simulation SuperLink listens on
    fixed ports, so two `flwr run` simulations on one machine would collide); waits for it."""
    path = Path(tempfile.gettempdir()) / "fedad-flwr-simulation.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if echo:
                print(f"fedad: waiting for another simulation to finish ({path})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_status(run_id: int, env: Mapping[str, str], wait: float = 30.0) -> str:
    """The run's status from `flwr ls --run-id ID --format json` (waits while still running)."""
    deadline = time.monotonic() + wait
    status = "unknown"
    while time.monotonic() < deadline:
        out = subprocess.run(
            [flwr_executable(), "ls", "--run-id", str(run_id), "--format", "json"],
            env=dict(env), capture_output=True, text=True, check=False,
        ).stdout
        try:
            status = json.loads(out)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            status = "unknown"
        if status.startswith("finished"):
            return status
        time.sleep(1.0)
    return status


def stop_local_superlink(flwr_home: str | Path) -> list[int]:
    """Stop the SuperLink (and its SuperExec) that `flwr run` started for ``flwr_home``."""
    marker = str(Path(flwr_home).resolve() / "local-superlink")
    stopped = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            pid = int(pid_dir.name)
            _terminate_tree(pid)
            stopped.append(pid)
    return stopped


def _terminate_tree(pid: int) -> None:
    children = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                if _parent_pid(p) == pid]
    for child in children:
        _terminate_tree(child)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _parent_pid(proc_dir: Path) -> int | None:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])
