"""Flower ClientApp: reads its site's settings, then hands each message to the method's site
logic (clients/)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import create_client
from fedad.config import ExperimentConfig
from fedad.deploy import local_site_data
from fedad.device import configure_threads
from fedad.methods import method_entry, resolve, site_actions
from fedad.privacy import CLIENT_MODS

app = ClientApp(mods=list(CLIENT_MODS))


def _reply(msg: Message, context: Context) -> Message:
    """Build this site's client from run-config + node-config and answer ``msg``.

    With a node-config ``data-path`` (a deployed site) the site's whole folder is its data;
    otherwise (a simulation) it holds partition ``partition-id`` of ``num-partitions``. torch's
    CPU threads are set first (``num-threads``; by default the ``OMP_NUM_THREADS`` that
    Flower's Ray simulation sets to the federation's ``client-resources-num-cpus``), so that
    simulated sites sharing a machine do not oversubscribe its cores.
    """
    node = context.node_config
    partition_id = int(node["partition-id"])
    if node.get("data-path"):
        cfg = ExperimentConfig.from_run_config(
            {**context.run_config, "data-path": node["data-path"]})
        client = resolve(method_entry(cfg.method).client)(
            cfg, local_site_data(cfg, partition_id), partition_id)
    else:
        cfg = ExperimentConfig.from_run_config(context.run_config)
        client = create_client(cfg, partition_id, int(node["num-partitions"]))
    configure_threads(cfg.num_threads)
    return Message(client.handle(msg.metadata.message_type, msg.content), reply_to=msg)


for _register in (app.train, app.evaluate, app.query):
    _register()(_reply)
for _action in site_actions():
    app.query(_action)(_reply)
