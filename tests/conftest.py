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
