"""What a site does for methods trained as one federated model (MSVT, MAE).

Training: load the global arrays, train on the site's partition (FedProx's proximal term and
Contrastive Feature Alignment plug in as extra losses), reply arrays and metrics, including
the local validation statistics that Adaptive Client Aggregation weighs clients by.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.base import SiteClient
from fedad.attacks import AttackSettings, apply_attack
from fedad.metrics import auroc, average_precision
from fedad.msvt import protocol
from fedad.seeding import seed_everything
from fedad.task import ExtraLoss, arrays_to_model, build_model, model_recipe, model_to_arrays
from fedad.train.contrastive import alignment_loss, embed, normal_prototype
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)


class ModelClient(SiteClient):
    """One site of a federation that trains a single model (``cfg.method``'s recipe)."""

    def train(self, content: RecordDict) -> RecordDict:
        """Load the global model, train locally, reply the new arrays and training metrics."""
        config: ConfigRecord = content["config"]
        server_round = int(config.get(protocol.SERVER_ROUND, 0))
        seed = self.cfg.seed + 1000 * self.partition_id + server_round
        seed_everything(seed)
        recipe = model_recipe(self.cfg)
        model = arrays_to_model(build_model(self.cfg), content["arrays"])
        samples = self.data.samples(self.partition_id, "train")
        metrics = recipe.fit(model, samples, self.cfg, seed=seed, server_round=server_round,
                             extra_loss=self._extra_loss(model, config))
        metrics.update(self._statistics(model, config))
        log.info("partition %d round %d: %s", self.partition_id, server_round,
                 {k: v for k, v in metrics.items() if not isinstance(v, list)})
        arrays = apply_attack(self.reply_arrays(model), content["arrays"], self.partition_id,
                              self.cfg.section(AttackSettings))  # a no-op unless attack is set
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})

    def reply_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        """The arrays a training reply carries: the model's trainable state."""
        return model_to_arrays(model)

    def _extra_loss(self, model: torch.nn.Module, config: ConfigRecord) -> ExtraLoss | None:
        """FedProx's proximal term and CFA's InfoNCE term, as the round's config asks."""
        terms = []
        mu = float(config.get(protocol.PROXIMAL_MU, 0.0))
        if mu > 0:
            terms.append(_proximal_term(model, mu))
        weight = float(config.get(protocol.CFA_WEIGHT, 0.0))
        if weight > 0:
            tau = float(config[protocol.CFA_TAU])
            terms.append(alignment_loss(self._anchors(config), tau, weight))
        if len(terms) <= 1:
            return terms[0] if terms else None
        return lambda output, labels: sum(term(output, labels) for term in terms)

    def _anchors(self, config: ConfigRecord) -> torch.Tensor | None:
        """The other sites' normal prototypes [C, D] broadcast with the config (CFA positives)."""
        if protocol.CFA_ANCHORS not in config:
            return None
        dim = int(config[protocol.CFA_ANCHOR_DIM])
        anchors = torch.tensor(config[protocol.CFA_ANCHORS], dtype=torch.float32).view(-1, dim)
        partitions = config[protocol.CFA_ANCHOR_PARTITIONS]
        others = torch.tensor([p != self.partition_id for p in partitions])
        return anchors[others]

    def _statistics(self, model: torch.nn.Module, config: ConfigRecord) -> dict:
        """What ACA / CFA ask for besides the model: q_i on the local val split and the
        site's normal prototype (a single vector), tagged with the partition."""
        stats: dict = {}
        if config.get(protocol.REPORT_VALIDATION, False):
            samples = self.data.samples(self.partition_id, "val")
            if samples:
                predictions = model_recipe(self.cfg).predict(model, samples, self.cfg, None)
                stats.update(validation_accuracy(predictions))
            else:
                log.warning("partition %d: no validation split, q_i not reported",
                            self.partition_id)
        if config.get(protocol.SEND_PROTOTYPE, False):
            normal = [s for s in self.data.samples(self.partition_id, "train") if s.label == 0]
            stats[protocol.PROTOTYPE] = normal_prototype(
                embed(model, normal, self.cfg.image_size, self.cfg.batch_size)).tolist()
        if stats:
            stats[protocol.PARTITION] = self.partition_id
        return stats

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Pixel and image accuracy (threshold 0.5) of the global model on the local val split.

        Never on training data: a site without validation samples replies with an error, which
        the strategy logs and leaves out.
        """
        samples = self.data.samples(self.partition_id, "val")
        if not samples:
            raise ValueError(
                f"partition {self.partition_id}: no local validation samples "
                f"(val-fraction={self.cfg.val_fraction}; sites with < 5 samples keep none)"
            )
        model = arrays_to_model(build_model(self.cfg), content["arrays"])
        predictions = model_recipe(self.cfg).predict(model, samples, self.cfg, None)
        return RecordDict({"metrics": MetricRecord(
            {**validation_accuracy(predictions), "num-examples": len(samples)}
        )})


def validation_accuracy(predictions: Predictions) -> dict[str, float]:
    """Pixel accuracy (Fed-MSVT eq. 4: (TP + TN) / all pixels) and image accuracy, both at the
    method's decision threshold 0.5 on maps and scores in [0, 1]; pixel AUROC, pixel AP and
    image AUROC (threshold-free; protocol.UNDEFINED where the split lacks a class)."""
    truth = predictions.masks.ravel() > 0.5
    labels = predictions.labels > 0
    pixel = ((predictions.maps.ravel() >= 0.5) == truth).mean()
    image = ((predictions.image_scores >= 0.5) == labels).mean()
    has_pixels, has_images = 0 < truth.sum() < truth.size, 0 < labels.sum() < labels.size
    return {
        protocol.VAL_PIXEL_ACCURACY: float(pixel), protocol.VAL_IMAGE_ACCURACY: float(image),
        protocol.VAL_PIXEL_AUROC: (auroc(truth, predictions.maps.ravel()) if has_pixels
                                   else protocol.UNDEFINED),
        protocol.VAL_PIXEL_AP: (average_precision(truth, predictions.maps.ravel())
                                if has_pixels else protocol.UNDEFINED),
        protocol.VAL_IMAGE_AUROC: (auroc(labels, predictions.ranked()) if has_images
                                   else protocol.UNDEFINED),
    }


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's (mu / 2) * ||w - w_global||^2 as an extra-loss callable."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    def term(output, labels) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))

    return term
