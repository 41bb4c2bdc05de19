"""Patch feature extractors: Lite0/1/2, a timm model from a local file, a trained MSVT."""

import pytest
import timm
import torch

from fedad.heads.features import build_extractor, photometric_normalised
from fedad.heads.settings import HeadSettings
from fedad.models import create_model, trainable_state_dict
from fedad.models.backbones import BackboneError, create_backbone, load_packaged_state_dict


def test_lite0_patch_features_have_the_finest_chosen_stride():
    extractor = build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=64)
    features = extractor(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 40 + 112, 8, 8) and extractor.dim == 152
    assert not any(p.requires_grad for p in extractor.parameters())


def test_packaged_lite2_patch_features_come_from_its_imagenet_weights():
    extractor = build_extractor("lite2", layers=(1, 2, 3), neighbourhood=3, image_size=64)
    features = extractor(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 24 + 48 + 120, 16, 16) and extractor.dim == 192
    packaged = create_backbone("lite2", out_indices=(1, 2, 3)).eval()
    torch.testing.assert_close(packaged.model.conv_stem.weight,
                               load_packaged_state_dict("lite2")["conv_stem.weight"])
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # the extractor's (batch-norm folded) levels compute the same maps
        for ours, reference in zip(extractor.levels(image), packaged(image), strict=True):
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4 * float(
                reference.abs().max()))


def test_neighbourhood_aggregation_smooths_features():
    images = torch.rand(1, 3, 64, 64)
    plain = build_extractor("lite0", layers=(2,), neighbourhood=1, image_size=64)(images)
    local = build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64)(images)
    assert local.shape == plain.shape and local.var() < plain.var()
    with pytest.raises(ValueError, match="feature-neighbourhood"):
        build_extractor("lite0", layers=(2,), neighbourhood=2, image_size=64)


def test_reflect_padding_keeps_the_grid_and_brings_border_patches_near_the_interior():
    # Stationary noise: every patch of the image looks alike, so border patch features should
    # lie near the interior ones; the backbone's zero padding pushes them far away, mirroring
    # the image outwards first brings them much closer.
    torch.manual_seed(0)
    noise = torch.rand(1, 3, 128, 128) * 0.2 + 0.4

    def border_distance(padding: int) -> float:
        features = build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=128,
                                   padding=padding)(noise)[0]
        assert features.shape == (152, 16, 16)
        interior = features[:, 4:12, 4:12].mean((1, 2))[:, None]
        border = torch.cat([features[:, :, 0], features[:, :, -1], features[:, 0],
                            features[:, -1]], dim=1)
        return float((border - interior).norm(dim=0).mean())

    assert border_distance(32) < 0.6 * border_distance(0)
    with pytest.raises(ValueError, match="feature-padding=12"):  # not a multiple of 16 px
        build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=128,
                        padding=12)(noise)
    with pytest.raises(ValueError, match="feature-padding=128"):  # no smaller than the image
        build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=128,
                        padding=128)(noise)


def test_feature_scales_concatenate_each_scale_on_the_finest_grid():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    double = build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=64,
                             scales=(1, 2), padding=16)
    assert double.dim == 2 * 152 and double(images).shape == (2, 304, 16, 16)
    # one level: the first block is the original image's map (resized to the finer grid), the
    # second the enlarged image's, a different view, not a copy
    level = build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64, padding=16,
                            scales=(1, 2))(images)
    original = build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64,
                               padding=16)(images)
    assert original.shape == (2, 40, 8, 8) and level.shape == (2, 80, 16, 16)
    coarse = torch.nn.functional.interpolate(original, size=(16, 16), mode="bilinear",
                                             align_corners=False)
    assert torch.allclose(level[:, :40], coarse, atol=1e-5)
    assert not torch.allclose(level[:, 40:], coarse, atol=1e-2)
    with pytest.raises(ValueError, match="feature-scales"):
        build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64, scales=(0,))
    with pytest.raises(ValueError, match="feature-padding=8"):  # 8 px at scale 1: not 16
        build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=64, scales=(1, 2),
                        padding=8)(images)


def test_photometric_normalisation_removes_each_images_colour_cast_and_contrast():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 0.5 + 0.2
    gain = torch.tensor([0.8, 1.1, 1.3]).view(1, 3, 1, 1)  # another camera / light
    tinted = image * gain
    offset = 0.5 * image + 0.1  # lower contrast, brighter
    for mode, other in (("grey-world", tinted), ("standardize", offset)):
        same = photometric_normalised(torch.cat([image, other]), mode)
        assert torch.allclose(same[0], same[1], atol=1e-5), mode
        assert torch.allclose(same.mean((-2, -1)), torch.tensor(0.45), atol=1e-3)
    # the features follow: equal under grey-world for the tinted copy, not without it
    plain = build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64)
    constant = build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64,
                               photometric="grey-world")
    assert torch.allclose(*constant(torch.cat([image, tinted])), atol=1e-4)
    assert not torch.allclose(*plain(torch.cat([image, tinted])), atol=1e-2)
    # a local defect survives: its place still differs from the clean image
    stained = image.clone()
    stained[..., 20:30, 20:30] = stained[..., 20:30, 20:30] * 0.7 + 0.3 * torch.tensor(
        [0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    pair = photometric_normalised(torch.cat([image, stained]), "grey-world")
    difference = (pair[0] - pair[1]).abs().sum(0)
    assert difference[20:30, 20:30].mean() > 10 * difference[40:, 40:].mean()
    with pytest.raises(ValueError, match="feature-photometric='sepia'"):
        build_extractor("lite0", layers=(2,), neighbourhood=3, image_size=64,
                        photometric="sepia")
    with pytest.raises(ValueError, match="feature-photometric='sepia'"):
        HeadSettings(feature_photometric="sepia")


def test_timm_model_by_name_loads_weights_from_a_local_file(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    extractor = build_extractor("resnet18", layers=(2, 3), neighbourhood=3, image_size=64,
                                pretrained="file", checkpoint=str(tmp_path / "resnet18.pt"))
    assert extractor(torch.rand(1, 3, 64, 64)).shape == (1, 128 + 256, 8, 8)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(BackboneError, match=r"bad\.pt"):
        build_extractor("resnet18", layers=(2,), neighbourhood=3, image_size=64,
                        pretrained="file", checkpoint=str(tmp_path / "bad.pt"))


def test_msvt_stage_features_come_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    msvt = create_model("msvt", image_size=64, backbone="none")
    path = tmp_path / "round-001.pt"
    torch.save({"round": 1, "state_dict": trainable_state_dict(msvt)}, path)
    extractor = build_extractor("msvt", layers=(0, 1), neighbourhood=3, image_size=64,
                                pretrained="file", checkpoint=str(path), msvt_backbone="none")
    images = torch.rand(2, 3, 64, 64)
    features = extractor(images)
    assert features.shape == (2, 96 + 128, 8, 8)
    torch.manual_seed(1)  # a differently initialised MSVT gives different features
    other = create_model("msvt", image_size=64, backbone="none")
    torch.save(trainable_state_dict(other), tmp_path / "other.pt")
    again = build_extractor("msvt", layers=(0, 1), neighbourhood=3, image_size=64,
                            pretrained="file", checkpoint=str(tmp_path / "other.pt"),
                            msvt_backbone="none")
    assert not torch.allclose(features, again(images))
    with pytest.raises(BackboneError, match="feature-checkpoint"):
        build_extractor("msvt", layers=(0,), neighbourhood=3, image_size=64, checkpoint="")
    with pytest.raises(BackboneError, match="feature-padding=32"):
        build_extractor("msvt", layers=(0,), neighbourhood=3, image_size=64,
                        pretrained="file", checkpoint=str(path), msvt_backbone="none", padding=32)
    with pytest.raises(BackboneError, match="feature-scales=1,2"):
        build_extractor("msvt", layers=(0,), neighbourhood=3, image_size=64,
                        pretrained="file", checkpoint=str(path), msvt_backbone="none",
                        scales=(1, 2))
    with pytest.raises(BackboneError, match="feature-layers=2,3"):
        build_extractor("msvt", layers=(2, 3), neighbourhood=3, image_size=64,
                        pretrained="file", checkpoint=str(path), msvt_backbone="none")


def test_centring_subtracts_each_images_mean_patch_feature():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    plain = build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=64)(images)
    centred = build_extractor("lite0", layers=(2, 3), neighbourhood=3, image_size=64,
                              centring=True)(images)
    assert centred.shape == plain.shape
    assert centred.mean((-2, -1)).abs().max() < 1e-4  # every image's channels average to 0
    torch.testing.assert_close(centred, plain - plain.mean((-2, -1), keepdim=True))
    assert plain.mean((-2, -1)).abs().max() > 0.01  # the backbone's own features are not centred


def test_a_checkpoint_goes_with_feature_pretrained_file_only():
    with pytest.raises(ValueError, match=r"feature-checkpoint='x\.pt' with "
                       r"feature-pretrained='packaged'"):
        HeadSettings(feature_checkpoint="x.pt")
    with pytest.raises(ValueError, match="feature-pretrained='file'"):
        HeadSettings(feature_pretrained="file")
    with pytest.raises(ValueError, match="feature-pretrained='imagenet'"):
        HeadSettings(feature_pretrained="imagenet")
