"""One cell of a ``runner: in-process`` sweep, run in its own Python process::

    python -m fedad.bench.cell CELL_FOLDER

Reads CELL_FOLDER/cell.json (written by :mod:`fedad.bench.sweep`) and runs its run-config
through :func:`fedad.inprocess.run_in_process` with the cell's number of sites, the results
going to CELL_FOLDER. The log goes to stderr; the exit status is 0 when the workflow returned.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from fedad.config import ExperimentConfig
from fedad.inprocess import run_in_process


def run_cell(folder: Path) -> dict:
    """Run the cell saved in ``folder``; its summary."""
    record = json.loads((folder / "cell.json").read_text())
    cfg = ExperimentConfig.from_run_config({**record["run_config"], "results-dir": str(folder)})
    return run_in_process(cfg, record["num_clients"])


def main(argv: list[str] | None = None) -> int:
    """Command line: the cell folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedad.bench.cell CELL_FOLDER", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    run_cell(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
