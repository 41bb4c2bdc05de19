"""Model helpers shared by the server and the sites (Flower's `task` module).

Methods trained as one federated model (``msvt``, ``mae``) describe themselves with a
:class:`ModelRecipe`; everything else here is method-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.device import device_of
from fedad.methods import method_entry, resolve
from fedad.metrics import anomaly_metrics
from fedad.models import load_trainable_state_dict, trainable_state_dict
from fedad.train.predictions import Predictions

ExtraLoss = Callable[[Any, torch.Tensor], torch.Tensor]
"""(model output, labels [B]) -> scalar added to the local loss (FedProx, CFA)."""


@dataclass(frozen=True)
class ModelRecipe:
    """How one method builds, trains and runs its model.

    Attributes:
        build: ``(cfg) -> nn.Module``, with pretrained weights where the method uses them.
        fit: ``(model, samples, cfg, *, seed, server_round, extra_loss) -> metrics`` trains in
            place on a site's samples, on the model's device; metrics include ``num-examples``.
        predict: ``(model, samples, cfg, defect_types) -> Predictions`` (numpy, whatever the
            model's device); ``maps`` and ``image_scores`` lie in [0, 1] and 0.5 is the
            method's decision threshold.
    """

    build: Callable[[ExperimentConfig], nn.Module]
    fit: Callable[..., dict[str, float]]
    predict: Callable[..., Predictions]


def model_recipe(cfg: ExperimentConfig) -> ModelRecipe:
    """The recipe of ``cfg.method`` (ValueError if the method is not a single-model method)."""
    entry = method_entry(cfg.method)
    if not entry.recipe:
        raise ValueError(f"method={cfg.method!r} is not trained as one federated model")
    return resolve(entry.recipe)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The configured method's model, with pretrained weights where the backbone has them, on
    the run's device (:func:`fedad.device.device_of`); its recipe's ``fit`` and ``predict``
    compute where the model is."""
    return model_recipe(cfg).build(cfg).to(device_of(cfg))


def evaluate_model(
    model: nn.Module, samples: Sequence[Sample], cfg: ExperimentConfig,
    defect_types: Sequence[str] | None = None,
) -> tuple[dict[str, float], Predictions]:
    """Detection metrics of ``model`` on ``samples`` (a test split), and the raw predictions."""
    predictions = model_recipe(cfg).predict(model, samples, cfg, defect_types)
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
