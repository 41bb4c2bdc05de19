"""One cell of a ``runner: in-process`` sweep, run in its own Python process::

    python -m fedad.bench.cell CELL_FOLDER

Reads CELL_FOLDER/cell.json (written by :mod:`fedad.bench.sweep`) and runs its run-config
through :func:`fedad.inprocess.run_in_process` with the cell's number of sites, the results
going to CELL_FOLDER. The log goes to stderr; the exit status is 0 when the workflow returned.

What the cell cost goes to CELL_FOLDER/cost.json beside the workflow's own summary.json (left as
the workflow writes it): ``peak_memory_mb``, the process's peak resident memory (server and
every site share it), and ``cell_seconds``, the wall time of the run in this process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fedad.bench.cost import COST, cell_main, peak_memory_mb
from fedad.config import ExperimentConfig
from fedad.inprocess import run_in_process


def run_cell(folder: Path) -> dict:
    """Run the cell saved in ``folder``; its summary. Writes ``folder``/cost.json."""
    started = time.perf_counter()
    record = json.loads((folder / "cell.json").read_text())
    cfg = ExperimentConfig.from_run_config({**record["run_config"], "results-dir": str(folder)})
    summary = run_in_process(cfg, record["num_clients"])
    cost = {"peak_memory_mb": peak_memory_mb(),
            "cell_seconds": round(time.perf_counter() - started, 2)}
    (folder / COST).write_text(json.dumps(cost, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: the cell folder."""
    return cell_main(argv, "fedad.bench.cell", run_cell)


if __name__ == "__main__":
    sys.exit(main())
