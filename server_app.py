"""Flower ServerApp: run-config -> experiment config -> the method's server workflow."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedad.config import ExperimentConfig
from fedad.methods import method_entry, resolve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the experiment from the run-config and run its method's workflow."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = ExperimentConfig.from_run_config(context.run_config)
    resolve(method_entry(cfg.method).server)(grid, cfg)
