"""Flower ClientApp: reads its site's settings, then hands each message to the method's site
logic (clients/)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import ACTIONS, create_client
from fedad.config import ExperimentConfig

app = ClientApp()


def _reply(msg: Message, context: Context) -> Message:
    """Build this site's client from run-config + node-config and answer ``msg``."""
    overrides = {}
    if context.node_config.get("data-path"):
        overrides["data-path"] = context.node_config["data-path"]
    cfg = ExperimentConfig.from_run_config({**context.run_config, **overrides})
    client = create_client(
        cfg, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    return Message(client.handle(msg.metadata.message_type, msg.content), reply_to=msg)


for _category, _actions in ACTIONS.items():
    _register = getattr(app, _category)
    _register()(_reply)
    for _action in _actions:
        _register(_action)(_reply)
