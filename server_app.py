"""Flower ServerApp: run-config -> experiment config -> the method's server workflow."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedad.config import ExperimentConfig
from fedad.device import configure_threads, device_of
from fedad.methods import method_entry, resolve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the experiment from the run-config, check its device (a ConfigError in one line
    when this machine lacks it), set this process's torch threads (``num-threads``) and run
    its method's workflow."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = ExperimentConfig.from_run_config(context.run_config)
    device = device_of(cfg)
    threads = configure_threads(cfg.num_threads)
    logging.getLogger(__name__).info("server: device %s, precision %s, %d torch threads",
                                     device, cfg.precision, threads)
    resolve(method_entry(cfg.method).server)(grid, cfg)
