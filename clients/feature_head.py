"""Site logic of the feature heads (method=memorybank|gmm|flow|padim).

``query.feature_moments``: moments of the local normal patch features (for the global
whitening). ``train``: fit a local head (round 1) or refinement statistics for the global head
in the message; reply with the typed payload. ``query.normal_map``: the mean anomaly map of the
local normal images under the global head (for the map baseline). ``evaluate``: score moments
of local normal validation images under the global head, less the map baseline the message
carries if any (for the server's calibration). Every handler applies the whitening the message
carries, if any. Only prototypes, statistics, mean maps and flow weights leave the site; patch
features and images never do.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from clients.base import SiteClient
from fedad.heads.payload import Payload, attached_arrays, payload_from_record
from fedad.heads.registry import extractor_for, head_for
from fedad.heads.scoring import BASELINE_RECORD
from fedad.heads.site import (
    calibration_moments,
    fit_or_refine,
    site_feature_moments,
    site_normal_map,
)
from fedad.heads.whitening import Whitening


class FeatureHeadClient(SiteClient):
    """One site of a feature-head run."""

    def _global_head(self, content: RecordDict) -> Payload | None:
        """The global head sent by the server (checked like any payload), or None."""
        if "head" not in content.array_records:
            return None
        head = head_for(self.cfg)
        return payload_from_record(content, head.fit_kind, head.sizes,
                                   head.reference_shapes(head.fit_kind))

    def _whitening(self, content: RecordDict) -> Whitening | None:
        """The server's whitening in the message (checked), or None."""
        return Whitening.from_content(content, extractor_for(self.cfg).dim)

    def _required_head(self, content: RecordDict, message_type: str) -> Payload:
        """The global head the message must carry; ValueError naming the message otherwise."""
        head = self._global_head(content)
        if head is None:
            raise ValueError(f"{message_type}: the message carries no global head")
        return head

    @staticmethod
    def _empty() -> RecordDict:
        """The reply of a site that abstains (no normal images)."""
        return RecordDict({"metrics": MetricRecord({"num-examples": 0})})

    def query_feature_moments(self, content: RecordDict) -> RecordDict:
        """Count, mean and second moment of the local normal patch features; an empty reply
        (num-examples 0) when the site holds no normal training images."""
        payload = site_feature_moments(self.cfg, self.partition_id, self.data.num_partitions)
        return self._empty() if payload is None else payload.to_record()

    def train(self, content: RecordDict) -> RecordDict:
        """Local fit or refinement; an empty reply (num-examples 0) when the site abstains."""
        payload = fit_or_refine(self.cfg, self.partition_id, self.data.num_partitions,
                                self._global_head(content), self._whitening(content))
        return self._empty() if payload is None else payload.to_record()

    def query_normal_map(self, content: RecordDict) -> RecordDict:
        """Mean anomaly map of the local normal images under the global head; an empty reply
        when the site holds none."""
        payload = site_normal_map(self.cfg, self.partition_id, self.data.num_partitions,
                                  self._required_head(content, "query.normal_map"),
                                  self._whitening(content))
        return self._empty() if payload is None else payload.to_record()

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Score moments (count, image / pixel mean and variance) for calibration."""
        size = self.cfg.image_size
        baseline = attached_arrays(content, BASELINE_RECORD, {"mean": (size, size)})
        moments = calibration_moments(self.cfg, self.partition_id, self.data.num_partitions,
                                      self._required_head(content, "evaluate"),
                                      self._whitening(content),
                                      None if baseline is None else baseline["mean"])
        return RecordDict({"metrics": MetricRecord(moments or {"count": 0.0})})
