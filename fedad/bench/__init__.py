"""Strategy benchmarking: YAML sweeps of real Flower simulations, their tables and plots.

- :mod:`fedad.bench.spec`: the sweep file (fixed values, a grid, the centralized reference)
  expanded into cells.
- :mod:`fedad.bench.sweep`: runs the cells (resumable, failures recorded).
- :mod:`fedad.bench.tables`: mean ± std tables (CSV, Markdown, LaTeX).
- :mod:`fedad.bench.plots`: metric per round, aggregation weights, ROC curves, anomaly maps.
- :mod:`fedad.bench.report`: rebuilds tables and plots of a sweep or a single run folder.
"""

from fedad.bench.spec import Cell, SweepError, SweepSpec, load_spec
from fedad.bench.sweep import CellOutcome, run_sweep

__all__ = ["Cell", "CellOutcome", "SweepError", "SweepSpec", "load_spec", "run_sweep"]
