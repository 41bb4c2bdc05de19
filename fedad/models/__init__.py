"""fedad models: a timm-style registry, feature backbones and the shared model parts.

``create_model(name, **kwargs)`` builds any registered model; ``list_models()`` names them.
The methods' own model files (:mod:`fedad.msvt.model`, :mod:`fedad.mae.model`) register their
models when imported, which importing this package does.
"""

from fedad.mae import model as _mae  # noqa: F401  (registers "mae")
from fedad.models._registry import create_model, list_models, register_model
from fedad.models.backbones import BackboneError, FeatureBackbone, create_backbone
from fedad.models.dyt import DyT
from fedad.models.state import load_trainable_state_dict, trainable_state_dict
from fedad.msvt import model as _msvt  # noqa: F401  (registers "msvt")

__all__ = [
    "BackboneError",
    "DyT",
    "FeatureBackbone",
    "create_backbone",
    "create_model",
    "list_models",
    "load_trainable_state_dict",
    "register_model",
    "trainable_state_dict",
]
