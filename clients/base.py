"""The site side of every method: one object per message, dispatching on the message type."""

from __future__ import annotations

from flwr.app import RecordDict

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.experiment import ExperimentData
from fedad.thresholds import SCORE_HISTOGRAM, SCORE_RANGE, site_sketch


class SiteClient:
    """Base of the per-method site logic.

    A message of type ``train``, ``evaluate`` or ``query`` (Flower's default actions) goes to
    the method of that name; ``<category>.<action>`` goes to ``<category>_<action>`` (dashes
    become underscores), e.g. ``query.upload-normals`` -> :meth:`query_upload_normals`. Each
    handler takes the message content and returns the reply content. Custom actions must be
    listed in the method's registry entry (``actions``) so that the ClientApp routes them;
    those every method answers (the decision thresholds' sketch, handled here) are
    :data:`fedad.methods.SHARED_ACTIONS`.

    Args:
        cfg: the experiment config (the same on every site, plus the site's own data-path).
        data: the resolved data (the same manifest on every site).
        partition_id: this site's partition.
    """

    def __init__(self, cfg: ExperimentConfig, data: ExperimentData, partition_id: int) -> None:
        self.cfg = cfg
        self.data = data
        self.partition_id = partition_id

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        """Run the handler of ``message_type`` on ``content`` and return the reply content."""
        name = message_type.replace(".", "_").replace("-", "_")
        handler = getattr(self, name, None)
        if handler is None:
            raise ValueError(
                f"method={self.cfg.method!r}: sites do not handle messages of type "
                f"{message_type!r}"
            )
        reply = handler(content)
        if not isinstance(reply, RecordDict):
            raise TypeError(f"{type(self).__name__}.{name} returned {type(reply).__name__}")
        return reply

    def held_out_normals(self) -> list[Sample]:
        """The site's held-out normal images: its validation split, label good."""
        return [s for s in self.data.samples(self.partition_id, "val") if s.label == 0]

    def query_threshold_range(self, content: RecordDict) -> RecordDict:
        """Min and max of the calibrated image scores and map values of the global model in
        ``content`` on the held-out normal images (:data:`fedad.thresholds.SCORE_RANGE`)."""
        return site_sketch(SCORE_RANGE, self.cfg, self.held_out_normals(), content)

    def query_threshold_histogram(self, content: RecordDict) -> RecordDict:
        """Their counts per bin of the server's edges (:data:`fedad.thresholds.SCORE_HISTOGRAM`)."""
        return site_sketch(SCORE_HISTOGRAM, self.cfg, self.held_out_normals(), content)
