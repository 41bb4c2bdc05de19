"""Cost of a real Flower simulation against the number of simulated clients, and the peak
memory of the server process and of one client process.

(a) For each N in ``--clients`` a real `flwr run` (Ray backend, 1 CPU per client, so at most as
many clients train at once as there are cores) of a small model: MSVT without a pretrained stem
(backbone none), 32x32 images, 1 local epoch of 1 batch, no client-side evaluation. Each N runs
twice, with 1 and with ``--rounds`` rounds; wall time per round is the difference of the
server-side run times (summary.json ``seconds``) over the extra rounds, so Ray start-up, data
preparation and model building cancel out. The exponent b of time/round ~ N^b is a
least-squares fit in log-log space.

(d) While each simulation runs, /proc is sampled every 0.2 s for the process tree of the
simulation SuperLink: the peak resident set size (VmHWM) of the `flwr-simulation` process
(ServerApp, strategy and server-side evaluation, plus the Ray driver) and of each Ray worker
that hosts ClientApps (the largest is reported).

    python bench/perf_simulation.py --clients 2,10,50,100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedad.data import generate_dataset
from fedad.simulation import run_simulation, stop_local_superlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PeakMemory:
    """Samples VmHWM of the processes under the simulation SuperLink of ``flwr_home``."""

    def __init__(self, flwr_home: Path, interval: float = 0.2) -> None:
        self.marker = str(flwr_home.resolve() / "local-superlink")
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, peak kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self, role: str) -> float:
        """Largest peak RSS (MiB) among the processes of ``role`` (server | client)."""
        values = [kb for r, kb in self.peaks.values() if r == role]
        return max(values) / 1024 if values else float("nan")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            table = _process_table()
            roots = [pid for pid, (_, cmd) in table.items()
                     if "flower-superlink" in cmd and self.marker in cmd]
            for pid in _descendants(roots, table):
                role = _role(table[pid][1])
                peak = _vm_hwm_kb(pid)
                if role and peak:
                    self.peaks[pid] = (role, max(peak, self.peaks.get(pid, (role, 0))[1]))


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every readable process."""
    table = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(proc.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def _descendants(roots: list[int], table: dict[int, tuple[int, str]]) -> list[int]:
    found, frontier = [], list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _role(cmdline: str) -> str:
    if "flwr-simulation" in cmdline:
        return "server"
    if cmdline.startswith("ray::") and "ClientApp" in cmdline:
        return "client"
    return ""


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def simulate(data: Path, num_clients: int, rounds: int, work: Path) -> dict:
    """One `flwr run` of the small config; its server-side seconds and peak memory."""
    results = work / f"n{num_clients}-r{rounds}"
    home = work / "flwr-home"
    run_config = {
        "data-path": str(data), "category": "washer", "image-size": 32, "backbone": "none",
        "num-server-rounds": rounds, "local-epochs": 1, "max-train-batches": 1,
        "batch-size": 4, "val-fraction": 0.0, "min-train-nodes": num_clients,
        "plot-every-round": False, "results-dir": str(results),
    }
    with PeakMemory(home) as memory:
        run = run_simulation(PROJECT_ROOT, num_supernodes=num_clients, run_config=run_config,
                             flwr_home=home, timeout=1800)
    stop_local_superlink(home)
    if not run.completed:
        raise RuntimeError(f"N={num_clients} rounds={rounds}: {run.status}\n{run.log[-3000:]}")
    summary = json.loads((results / "summary.json").read_text())
    return {"clients": num_clients, "rounds": rounds, "server_seconds": summary["seconds"],
            "flwr_run_seconds": run.seconds, "server_peak_mib": memory.peak_mib("server"),
            "client_peak_mib": memory.peak_mib("client")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="2,10,50,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="fedad-perf-sim-"))
    data = generate_dataset(work / "mvtec", categories=["washer"], image_size=32,
                            num_train=4 * max(counts), num_test_good=8, num_test_per_defect=3)
    runs = []
    for n in counts:
        for rounds in (1, args.rounds):
            runs.append(simulate(data, n, rounds, work))
            print(json.dumps(runs[-1]), flush=True)
    frame = pd.DataFrame(runs)
    wide = frame.pivot(index="clients", columns="rounds", values="server_seconds")
    table = pd.DataFrame({
        "clients": wide.index,
        "seconds_per_round": (wide[args.rounds] - wide[1]) / (args.rounds - 1),
        "flwr_run_seconds": frame[frame["rounds"] == args.rounds].set_index("clients")[
            "flwr_run_seconds"],
        "server_peak_mib": frame.groupby("clients")["server_peak_mib"].max(),
        "client_peak_mib": frame.groupby("clients")["client_peak_mib"].max(),
    }).reset_index(drop=True)
    exponent = np.polyfit(np.log(table["clients"]), np.log(table["seconds_per_round"]), 1)[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, rounds 1 and {args.rounds}\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))
    print(f"\nfitted exponent b (seconds per round ~ clients^b): {exponent:.2f}")
    frame.to_csv(work / "runs.csv", index=False)


if __name__ == "__main__":
    main()
