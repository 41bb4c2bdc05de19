"""An in-process Grid: the real server workflow and the real site logic, without Ray or
network, for fast deterministic benchmarks and tests.

Every message goes through the ClientApp's mods (:data:`fedad.privacy.CLIENT_MODS`) to
``create_client(...).handle(...)`` in this process, exactly what the ClientApp does in a
simulation or deployment; only the transport differs. Results of a
`flwr run` simulation and of this grid agree up to floating-point order (the guard aggregates
replies in content order either way).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import create_client
from fedad.config import ExperimentConfig
from fedad.device import device_of
from fedad.methods import method_entry, resolve
from fedad.privacy import CLIENT_MODS

log = logging.getLogger(__name__)

FIRST_NODE_ID = 1001


class InProcessGrid(Grid):
    """``num_sites`` sites with node ids 1001, 1002, ... holding partitions 0, 1, ...

    Args:
        cfg: the experiment config every site uses.
        num_sites: number of sites (= partitions).
    """

    def __init__(self, cfg: ExperimentConfig, num_sites: int) -> None:
        self.cfg = cfg
        self.partitions = {FIRST_NODE_ID + i: i for i in range(num_sites)}
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=cfg.to_dict(),
                          node_config={"partition-id": p, "num-partitions": num_sites})
            for node, p in self.partitions.items()}
        self._call = make_ffn(self._site_reply, list(CLIENT_MODS))
        self._run = None
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def set_run(self, run) -> None:
        """Remember the run (unused in process)."""
        self._run = run

    @property
    def run(self):
        """The run set with :meth:`set_run`."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A message to one site."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The sites' node ids."""
        return list(self.partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not supported: use :meth:`send_and_receive`."""
        raise NotImplementedError("InProcessGrid answers messages in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not supported: use :meth:`send_and_receive`."""
        raise NotImplementedError("InProcessGrid answers messages in send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Each site answers its message in turn; a site's exception becomes an error reply."""
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        partition = self.partitions[node]
        try:
            return self._call(msg, self.contexts[node])
        except Exception as err:  # the site's failure becomes its reply, as in Flower
            log.error("partition %d failed: %s", partition, traceback.format_exc(limit=3))
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def _site_reply(self, msg: Message, context: Context) -> Message:
        """The site's reply to ``msg``, inside the mods (what the ClientApp's handler does)."""
        client = create_client(self.cfg, int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]))
        return Message(client.handle(msg.metadata.message_type, msg.content), reply_to=msg)


def run_in_process(cfg: ExperimentConfig, num_sites: int) -> dict:
    """Run ``cfg.method``'s server workflow with ``num_sites`` in-process sites; its summary.
    The run's device is checked first (ConfigError in one line when this machine lacks it);
    the process's torch threads are left as they are (the sites share them)."""
    device_of(cfg)
    return resolve(method_entry(cfg.method).server)(InProcessGrid(cfg, num_sites), cfg)
