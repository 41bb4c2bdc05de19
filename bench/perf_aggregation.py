"""Server aggregation time of every registered strategy on the same replies, as a ratio to
FedAvg.

Replies are hand-built Flower Messages, one per simulated client: the trainable arrays of the
configured model plus small Gaussian noise, with the metrics the strategies read (num-examples,
val_pixel_accuracy for ACA, a normal-feature prototype for CFA, partition). Each strategy is
built fresh from the registry (wrapped in the reply guard, as in a run), configured for round 1
with the global arrays, then timed on aggregate_train only. Median of ``--repeats``, wall clock
and process CPU time.

    python bench/perf_aggregation.py --clients 10 --repeats 15
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedad.config import ExperimentConfig
from fedad.task import build_model, model_to_arrays
from strategies import build_strategy, list_strategies


class NodeList:
    """The part of a Grid that configure_train reads: the connected node ids."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        """Node ids 1..N."""
        return self.nodes


def make_replies(arrays: ArrayRecord, num_clients: int, seed: int = 0) -> list[Message]:
    """One train reply per node: ``arrays`` + N(0, 1e-3) noise, with ACA/CFA metrics."""
    rng = np.random.default_rng(seed)
    replies = []
    for node in range(1, num_clients + 1):
        noisy = {key: torch.from_numpy(a.numpy() + rng.normal(0, 1e-3, a.shape).astype(
            a.numpy().dtype)) for key, a in arrays.items()}
        metrics = MetricRecord({"num-examples": int(rng.integers(10, 30)),
                                "train_loss": 0.5, "val_pixel_accuracy": 0.9 + 0.01 * node,
                                "partition": node - 1, "prototype": rng.normal(size=64).tolist()})
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": ArrayRecord(noisy), "metrics": metrics}),
                               reply_to=sent))
    return replies


def time_strategy(cfg: ExperimentConfig, arrays: ArrayRecord, num_clients: int,
                  repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of aggregate_train of a freshly configured
    ``cfg.strategy`` on fresh copies of the same replies (a strategy may annotate the replies
    it reads)."""
    times, cpu = [], []
    for _ in range(repeats):
        replies = make_replies(arrays, num_clients)
        strategy = build_strategy(cfg)
        list(strategy.configure_train(1, arrays, ConfigRecord(), NodeList(num_clients)))
        start, start_cpu = time.perf_counter(), time.process_time()
        aggregated, _ = strategy.aggregate_train(1, replies)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if aggregated is None:
            raise RuntimeError(f"strategy={cfg.strategy}: aggregated nothing from the replies")
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="lite0")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = ExperimentConfig(image_size=args.image_size, backbone=args.backbone,
                           min_train_nodes=args.clients)
    arrays = model_to_arrays(build_model(cfg))
    size_mb = sum(a.numpy().nbytes for a in arrays.values()) / 2**20
    rows = []
    for name in list_strategies():
        wall, cpu = time_strategy(cfg.replace(strategy=name), arrays, args.clients, args.repeats)
        rows.append({"strategy": name, "median_ms": 1000 * wall, "median_cpu_ms": 1000 * cpu})
    table = pd.DataFrame(rows)
    fedavg = table.set_index("strategy").loc["fedavg"]
    table["ratio_to_fedavg"] = table["median_ms"] / fedavg["median_ms"]
    table["cpu_ratio_to_fedavg"] = table["median_cpu_ms"] / fedavg["median_cpu_ms"]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}: {args.clients} replies of the MSVT ({args.backbone}, "
          f"{args.image_size}px) trainable arrays, {size_mb:.2f} MiB each, median of "
          f"{args.repeats}\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
