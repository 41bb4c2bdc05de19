"""What a site does for methods trained as one federated model (MSVT, MAE).

Training: load the global arrays, train on the site's partition (FedProx's proximal term and
Contrastive Feature Alignment plug in as extra losses), reply arrays and metrics, including
the local validation statistics that Adaptive Client Aggregation weighs clients by.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from clients.base import SiteClient
from fedad.seeding import seed_everything
from fedad.task import arrays_to_model, model_recipe, model_to_arrays
from fedad.train.predictions import Predictions

log = logging.getLogger(__name__)


class ModelClient(SiteClient):
    """One site of a federation that trains a single model (``cfg.method``'s recipe)."""

    def train(self, content: RecordDict) -> RecordDict:
        """Load the global model, train locally, reply the new arrays and training metrics."""
        config: ConfigRecord = content["config"]
        server_round = int(config.get("server-round", 0))
        seed = self.cfg.seed + 1000 * self.partition_id + server_round
        seed_everything(seed)
        recipe = model_recipe(self.cfg)
        model = arrays_to_model(recipe.build(self.cfg), content["arrays"])
        samples = self.data.samples(self.partition_id, "train")
        mu = float(config.get("proximal-mu", 0.0))
        extra_loss = _proximal_term(model, mu) if mu > 0 else None
        metrics = recipe.fit(model, samples, self.cfg, seed=seed, server_round=server_round,
                             extra_loss=extra_loss)
        log.info("partition %d round %d: %s", self.partition_id, server_round, metrics)
        return RecordDict({"arrays": model_to_arrays(model), "metrics": MetricRecord(metrics)})

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
        recipe = model_recipe(self.cfg)
        model = arrays_to_model(recipe.build(self.cfg), content["arrays"])
        predictions = recipe.predict(model, samples, self.cfg, None)
        return RecordDict({"metrics": MetricRecord(
            {**validation_accuracy(predictions), "num-examples": len(samples)}
        )})


def validation_accuracy(predictions: Predictions) -> dict[str, float]:
    """Pixel accuracy (Fed-MSVT eq. 4: (TP + TN) / all pixels) and image accuracy, both at the
    method's decision threshold 0.5 on maps and scores in [0, 1]."""
    pixel = ((predictions.maps >= 0.5) == (predictions.masks > 0.5)).mean()
    image = ((predictions.image_scores >= 0.5) == (predictions.labels > 0)).mean()
    return {"val_pixel_accuracy": float(pixel), "val_image_accuracy": float(image)}


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's (mu / 2) * ||w - w_global||^2 as an extra-loss callable."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    def term(output, labels) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))

    return term
