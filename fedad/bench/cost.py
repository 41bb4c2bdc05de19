"""What the cell processes (:mod:`fedad.bench.cell`, :mod:`fedad.bench.peer`) share: what a
cell cost, measured inside its own process, and their command line; kept apart from both so
that neither imports the other."""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Callable
from pathlib import Path

COST = "cost.json"
"""In a cell folder: ``peak_memory_mb`` and ``cell_seconds`` of an in-process cell's process."""


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (getrusage's ru_maxrss, KiB on
    Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cell_main(argv: list[str] | None, module: str, run: Callable[[Path], object],
              known_errors: tuple[type[Exception], ...] = ()) -> int:
    """``python -m MODULE CELL_FOLDER``: run ``run(folder)`` with INFO logging; 2 with a usage
    line for bad arguments, 1 with one ``error:`` line for a ``known_errors`` exception."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} CELL_FOLDER", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        run(Path(args[0]))
    except known_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
