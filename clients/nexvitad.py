"""Site logic of NexViTAD (method=nexvitad).

Training stage: ``train`` / ``evaluate`` as every single-model method (:class:`ModelClient`),
except that a training reply carries only the parameters this site trained (the adapters,
projections, the heads of the categories it holds and, where it holds labelled source images,
the pseudo-labelling head). ``query.nexvitad_encoder``: keep the trained encoder on this
site's disk. Memory-bank stage: the feature-head messages (``train`` / ``evaluate`` without
the model's ``arrays``, ``query.feature_moments``, ``query.normal_map`` and the thresholds'
queries) go to a feature-head site on the trained encoder, whose held-out normals are the
target category's. Images and features never leave the site; the target's images are used
without their labels.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from clients.feature_head import FeatureHeadClient
from clients.model import ModelClient
from fedad.data import Sample
from fedad.heads.registry import extractor_for, feature_grid, head_settings
from fedad.heads.site import normal_patches
from fedad.models import trainable_state_dict
from fedad.nexvitad.model import write_encoder
from fedad.nexvitad.protocol import ENCODER_RECORD, MODEL_RECORD
from fedad.nexvitad.settings import NexViTADSettings
from fedad.nexvitad.stages import bank_config, site_encoder_path
from fedad.nexvitad.training import trained_prefixes


class TargetBankClient(FeatureHeadClient):
    """A feature-head site of the memory-bank stage: held-out normals of the target only."""

    def held_out_normals(self) -> list[Sample]:
        """The validation split's normal images of the target category."""
        target = head_settings(self.cfg).target_category
        return [s for s in super().held_out_normals() if s.category == target]


class NexViTADClient(ModelClient):
    """One site of a NexViTAD run (module docstring)."""

    def reply_arrays(self, model: nn.Module) -> ArrayRecord:
        """The trainable arrays under :func:`fedad.nexvitad.training.trained_prefixes` of the
        categories this site trains on."""
        categories = sorted({s.category for s in self.data.samples(self.partition_id, "train")})
        prefixes = trained_prefixes(model, categories, head_settings(self.cfg).target_category)
        return ArrayRecord({k: v for k, v in trainable_state_dict(model).items()
                            if k.startswith(prefixes)})

    def bank(self) -> TargetBankClient:
        """This site in the memory-bank stage, on the encoder it keeps."""
        path = site_encoder_path(self.cfg, self.partition_id)
        return TargetBankClient(bank_config(self.cfg, path), self.data, self.partition_id)

    def query_nexvitad_encoder(self, content: RecordDict) -> RecordDict:
        """Keep the trained encoder the message carries (:func:`site_encoder_path`); the
        process's feature caches of an earlier encoder at that path are dropped."""
        state = content.array_records[ENCODER_RECORD].to_torch_state_dict()
        write_encoder(self.cfg.section(NexViTADSettings), state,
                      site_encoder_path(self.cfg, self.partition_id))
        for cached in (extractor_for, feature_grid, normal_patches):
            cached.cache_clear()
        return RecordDict({"metrics": MetricRecord({"arrays": len(state)})})

    def train(self, content: RecordDict) -> RecordDict:
        """Local training (the model's arrays in the message) or the bank's fit."""
        if MODEL_RECORD in content.array_records:
            return super().train(content)
        return self.bank().train(content)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Local validation of the global model, or the bank's calibration moments."""
        if MODEL_RECORD in content.array_records:
            return super().evaluate(content)
        return self.bank().evaluate(content)

    def query_feature_moments(self, content: RecordDict) -> RecordDict:
        """The bank stage's feature moments (:class:`FeatureHeadClient`)."""
        return self.bank().query_feature_moments(content)

    def query_normal_map(self, content: RecordDict) -> RecordDict:
        """The bank stage's mean normal map (:class:`FeatureHeadClient`)."""
        return self.bank().query_normal_map(content)

    def query_threshold_range(self, content: RecordDict) -> RecordDict:
        """The bank's score range on the target's held-out normals."""
        return self.bank().query_threshold_range(content)

    def query_threshold_histogram(self, content: RecordDict) -> RecordDict:
        """The bank's score histogram on the target's held-out normals."""
        return self.bank().query_threshold_histogram(content)
