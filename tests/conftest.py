"""Shared fixtures."""

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity():
    """Flower Messages built outside a running app need a task identity; tests that build
    replies by hand (strategies, DP wrappers) use a fixed one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one torch thread avoids oversubscribing CI's two cores (module-wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs_once(tmp_path_factory):
    """``runs_once(config_for)`` -> ``results(method)``: the results folder of a finished
    two-site in-process run of ``config_for(method, folder)``, run once per method and module."""
    from fedad.inprocess import run_in_process

    def runner(config_for):
        folders = {}

        def results(method: str):
            if method not in folders:
                folders[method] = tmp_path_factory.mktemp(method)
                run_in_process(config_for(method, folders[method]), 2)
            return folders[method]

        return results

    return runner
