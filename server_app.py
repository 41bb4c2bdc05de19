"""Flower ServerApp: run-config -> experiment config -> strategy.start(...) -> results folder."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedad.config import ExperimentConfig
from fedad.federation import run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the experiment from the run-config and run it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_federated(grid, ExperimentConfig.from_run_config(context.run_config))
