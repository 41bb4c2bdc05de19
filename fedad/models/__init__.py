"""fedad models: a timm-style registry, feature backbones and the model families.

``create_model(name, **kwargs)`` builds any registered model; ``list_models()`` names them.
"""

from fedad.models._registry import create_model, list_models, register_model
from fedad.models.backbones import BackboneError, FeatureBackbone, create_backbone
from fedad.models.dyt import DyT
from fedad.models.mae import MAEOutput, MaskedAutoencoder
from fedad.models.msvt import (
    MSVT,
    MSVTOutput,
    load_trainable_state_dict,
    trainable_state_dict,
)

__all__ = [
    "MSVT",
    "BackboneError",
    "DyT",
    "FeatureBackbone",
    "MAEOutput",
    "MSVTOutput",
    "MaskedAutoencoder",
    "create_backbone",
    "create_model",
    "list_models",
    "load_trainable_state_dict",
    "register_model",
    "trainable_state_dict",
]
