"""What a site does for the MSVT method: local training on its partition, local validation."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedad.config import ExperimentConfig
from fedad.experiment import ExperimentData
from fedad.seeding import seed_everything
from fedad.task import arrays_to_model, build_model, model_to_arrays
from fedad.train.supervised import predict, train_local

log = logging.getLogger(__name__)


class MSVTClient:
    """One site of a Fed-MSVT federation.

    Args:
        cfg: the experiment config.
        data: the resolved data (the same manifest on every site).
        partition_id: this site's partition.
    """

    def __init__(self, cfg: ExperimentConfig, data: ExperimentData, partition_id: int) -> None:
        self.cfg = cfg
        self.data = data
        self.partition_id = partition_id

    def train(self, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
        """Load the global model, train locally, return the new arrays and training metrics."""
        server_round = int(config.get("server-round", 0))
        seed = self.cfg.seed + 1000 * self.partition_id + server_round
        seed_everything(seed)
        model = arrays_to_model(build_model(self.cfg), arrays)
        samples = self.data.samples(self.partition_id, "train")
        mu = float(config.get("proximal-mu", 0.0))
        extra_loss = _proximal_term(model, mu) if mu > 0 else None
        metrics = train_local(
            model, samples, image_size=self.cfg.image_size, epochs=self.cfg.local_epochs,
            batch_size=self.cfg.batch_size, lr=self.cfg.lr, seed=seed,
            max_batches=self.cfg.max_train_batches, extra_loss=extra_loss,
        )
        log.info("partition %d round %d: %s", self.partition_id, server_round, metrics)
        return model_to_arrays(model), MetricRecord(metrics)

    def evaluate(self, arrays: ArrayRecord, config: ConfigRecord) -> MetricRecord:
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
        model = arrays_to_model(build_model(self.cfg), arrays)
        predictions = predict(model, samples, self.cfg.image_size)
        pixel_acc = float(((predictions.maps >= 0.5) == (predictions.masks > 0.5)).mean())
        image_acc = float(((predictions.image_scores >= 0.5) == (predictions.labels > 0)).mean())
        return MetricRecord({
            "val_pixel_accuracy": pixel_acc,
            "val_image_accuracy": image_acc,
            "num-examples": len(samples),
        })


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's (mu / 2) * ||w - w_global||^2 as an extra-loss callable."""
    anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]

    def term(output, labels) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))

    return term
