"""The D-ADDA rule as a Flower strategy: stages 1-2 of D-ADDA (seed 001, eq. (3)).

Only D_server = {(I, y) | y = 0} U {(M, y) | y = 1} may reach the server: normal images and
defect masks with their class, never a defective image. :class:`DADDAUploadStrategy` runs one
round of Flower's Message API:

- ``configure_train`` asks every site for its eq. (3) payload (:data:`fedad.dadda.protocol.UPLOAD`);
- ``check_reply`` parses and checks one reply through the typed payload
  (:func:`fedad.dadda.payload.inspect_upload`, the single place of the rule). It runs inside
  the reply guard (:class:`strategies.guard.GuardedStrategy`), which refuses, logs and audits
  every reply that breaks the rule, so the other sites' uploads are still used;
- ``aggregate_train`` trains G^I on the accepted normal images and G^M on the accepted masks
  (:func:`fedad.dadda.generators.train_generators`); its arrays (both generators,
  :func:`fedad.dadda.generators.pack_generators`) are the result that goes out with the next
  query (the synthesis on the sites).

Reuse: any method that sends images to the server, for whatever reason, builds them with
:func:`fedad.dadda.payload.build_upload` on the site and receives them through this strategy
(or its ``check_reply``) behind the guard, so the same typed check and audit apply.
:meth:`state_dict` (accepted uploads, generator statistics) goes into the run's stage
checkpoint with the generator weights, so a killed server resumes after stage 2.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.dadda.generators import pack_generators, train_generators
from fedad.dadda.payload import inspect_upload, record_to_upload, upload_details
from fedad.dadda.protocol import SEND_UPLOAD, UPLOAD
from fedad.dadda.settings import DADDASettings
from fedad.device import CPU

log = logging.getLogger(__name__)


class DADDAUploadStrategy(Strategy):
    """Stage 1 (uploads) and stage 2 (generators) of D-ADDA; see the module docstring.

    Args:
        settings: the run's ``dadda-*`` settings.
        num_types: number of defect types (G^M's classes, "good" excluded).
        upload_classes: number of mask classes an upload may carry ("good" included, as 0).
        seed: seed of the generators' training.
        device, precision: where and at which autocast precision the generators train.
    """

    def __init__(self, settings: DADDASettings, num_types: int, upload_classes: int,
                 seed: int, device: torch.device = CPU,
                 precision: str = "32") -> None:
        self.settings = settings
        self.num_types = num_types
        self.upload_classes = upload_classes
        self.seed = seed
        self.device, self.precision = device, precision
        self.accepted = 0
        self.generator_stats: dict[str, float] = {}

    def summary(self) -> None:
        """Log what the strategy does."""
        log.info("DADDAUploadStrategy: eq. (3) uploads, then G^I / G^M on the accepted ones")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask every connected site for its upload."""
        content = RecordDict({"config": ConfigRecord({**config, SEND_UPLOAD: True})})
        return [grid.create_message(RecordDict(dict(content.items())), UPLOAD.message, node,
                                    str(server_round))
                for node in sorted(grid.get_node_ids())]

    def check_reply(self, content: RecordDict) -> tuple[str | None, dict]:
        """(the broken rule or None, the upload's audit details) of one reply."""
        upload, reason = inspect_upload(content, num_classes=self.upload_classes)
        return reason, upload_details(upload)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Train G^I / G^M on the replies the guard kept (error replies are skipped), taken in
        node-id order so that the generators do not depend on the order of arrival."""
        kept = sorted((r for r in replies if not r.has_error()),
                      key=lambda reply: reply.metadata.src_node_id)
        uploads = [record_to_upload(reply.content) for reply in kept]
        self.accepted = len(uploads)
        log.info("stage 1: %d uploads accepted", self.accepted)
        if not uploads:
            return None, None
        image_model, mask_model, self.generator_stats = train_generators(
            uploads, self.settings, self.num_types, self.seed, self.device, self.precision)
        return (pack_generators(image_model, mask_model),
                MetricRecord({"uploads_accepted": self.accepted, **self.generator_stats}))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No evaluation round: the generators are judged by the detector they train."""
        return []

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate."""
        return None

    def state_dict(self) -> dict:
        """Accepted uploads and the generators' statistics (for the stage checkpoint)."""
        return {"accepted": self.accepted, "generator_stats": dict(self.generator_stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.accepted = int(state["accepted"])
        self.generator_stats = dict(state["generator_stats"])
