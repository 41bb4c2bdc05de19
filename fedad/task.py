"""Model helpers shared by the server and the sites (Flower's `task` module)."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord
from torch import nn

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.metrics import anomaly_metrics
from fedad.models import create_model, load_trainable_state_dict, trainable_state_dict
from fedad.train.supervised import Predictions, predict


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The configured method's model, with pretrained weights where the backbone has them."""
    return create_model(cfg.method, image_size=cfg.image_size, backbone=cfg.backbone,
                        backbone_checkpoint=cfg.backbone_checkpoint or None)


def evaluate_model(
    model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig,
    defect_types: Sequence[str] | None = None,
) -> tuple[dict[str, float], Predictions]:
    """Detection metrics of ``model`` on ``samples`` (a test split), and the raw predictions."""
    predictions = predict(model, samples, cfg.image_size, defect_types=defect_types,
                          batch_size=max(cfg.batch_size, 16))
    metrics = anomaly_metrics(
        predictions.labels, predictions.image_scores, predictions.masks, predictions.maps
    )
    return metrics, predictions


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's trainable state as an ArrayRecord: the federated payload (a frozen pretrained
    backbone stays on each site)."""
    return ArrayRecord(trainable_state_dict(model))


def arrays_to_model(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load a payload into ``model`` (strict: keys and shapes must match); returns ``model``."""
    load_trainable_state_dict(model, arrays.to_torch_state_dict())
    return model
