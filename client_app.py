"""Flower ClientApp: reads its site's settings, then dispatches to the method's client logic."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import create_client
from fedad.config import ExperimentConfig

app = ClientApp()


def _client(context: Context):
    overrides = {}
    if context.node_config.get("data-path"):
        overrides["data-path"] = context.node_config["data-path"]
    cfg = ExperimentConfig.from_run_config({**context.run_config, **overrides})
    return create_client(
        cfg, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on the site's partition; replies arrays + metrics."""
    arrays, metrics = _client(context).train(
        msg.content["arrays"], msg.content["config"]
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local evaluation of the global model on the site's validation split."""
    metrics: MetricRecord = _client(context).evaluate(
        msg.content["arrays"], msg.content["config"]
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
