"""Benchmarking: YAML sweeps of real Flower simulations or in-process runs, their tables and
plots.

- :mod:`fedad.bench.spec`: the sweep file (fixed values, a grid, the centralized reference, the
  peers, the runner, the table's report options) expanded into cells.
- :mod:`fedad.bench.sweep`: runs the cells (resumable, failures recorded; the finished-run
  rule).
- :mod:`fedad.bench.cell`: one cell of a ``runner: in-process`` sweep, in its own process.
- :mod:`fedad.bench.peer`: one peer cell, an anomalib model on the same images and backbone.
- :mod:`fedad.bench.cost`: peak memory of a cell's process.
- :mod:`fedad.bench.tables`: mean ± std tables (CSV, Markdown, LaTeX) and derived columns.
- :mod:`fedad.bench.plots`: metric per round, aggregation weights, ROC curves, anomaly maps.
- :mod:`fedad.bench.report`: rebuilds tables and plots of a sweep or a single run folder.
"""

from fedad.bench.spec import Cell, SweepError, SweepSpec, load_spec
from fedad.bench.sweep import CellOutcome, run_sweep

__all__ = ["Cell", "CellOutcome", "SweepError", "SweepSpec", "load_spec", "run_sweep"]
