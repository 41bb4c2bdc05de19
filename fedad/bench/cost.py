"""What a cell cost, measured inside its own process (:mod:`fedad.bench.cell`,
:mod:`fedad.bench.peer`); kept apart from both so that measuring imports neither."""

from __future__ import annotations

import resource

COST = "cost.json"
"""In a cell folder: ``peak_memory_mb`` and ``cell_seconds`` of an in-process cell's process."""


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (getrusage's ru_maxrss, KiB on
    Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
