"""Feature backbones: packaged Lite0/1/2 weights, feature pyramids, local checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data

from fedad.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    create_backbone,
    create_classifier,
    fold_batchnorm,
    load_packaged_state_dict,
    pretrained_classifier,
)

EGYPTIAN_CAT = 285  # ImageNet class of skimage's chelsea


@pytest.mark.parametrize("name, tensors", [("lite0", 296), ("lite1", 386), ("lite2", 386)])
def test_packaged_state_dict_maps_all_tensors_onto_timm_names(name: str, tensors: int) -> None:
    state = load_packaged_state_dict(name)
    assert len(state) == tensors
    assert next(iter(state)) == "conv_stem.weight"
    assert tuple(state["classifier.weight"].shape) == (1000, 1280)


def test_unknown_packaged_backbone_lists_the_packaged_names() -> None:
    with pytest.raises(BackboneError, match=r"'lite9'.*lite0, lite1, lite2"):
        load_packaged_state_dict("lite9")


def test_lite0_state_dict_rejects_a_foreign_file(tmp_path: Path) -> None:
    source = load_packaged_state_dict()
    keys = list(source)
    source[keys[0]] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(source, path)
    with pytest.raises(BackboneError, match=r"bad\.pth.*conv_stem\.weight \(8, 3, 3, 3\)"):
        load_packaged_state_dict(path=path)
    torch.save(dict(list(source.items())[:-1]), path)
    with pytest.raises(BackboneError, match="295 tensors"):
        load_packaged_state_dict(path=path)


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_packaged_classifier_classifies_chelsea_as_egyptian_cat(name: str) -> None:
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = pretrained_classifier(name)((image - mean) / std)
    assert logits.argmax(1).item() == EGYPTIAN_CAT


@pytest.mark.parametrize("name, channels", [("lite0", [24, 40, 112]), ("lite2", [24, 48, 120])])
def test_packaged_features_shapes_channels_strides(name: str, channels: list[int]) -> None:
    backbone = create_backbone(name).eval()
    assert backbone.channels == channels
    assert backbone.strides == [4, 8, 16]
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 128, 128))
    assert [tuple(f.shape) for f in features] == [
        (2, c, 128 // s, 128 // s) for c, s in zip(channels, [4, 8, 16], strict=True)
    ]


def test_checkpoint_round_trip_for_another_timm_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    torch.manual_seed(1)
    backbone = create_backbone("resnet18", weights="file", checkpoint=path).eval()
    assert backbone.channels == [64, 128, 256] and backbone.strides == [4, 8, 16]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(
            (images - backbone.mean) / backbone.std, indices=[1, 2, 3], intermediates_only=True
        )
        for a, b in zip(backbone(images), expected, strict=True):
            assert torch.equal(a, b)


def test_wrong_checkpoint_names_the_file_and_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"model": {"conv1.weight": torch.zeros(1, 1, 1, 1)}}, path)
    with pytest.raises(BackboneError, match=r"wrong\.pt.*conv1\.weight.*missing"):
        create_backbone("resnet18", weights="file", checkpoint=path)


def test_unreadable_checkpoint_is_a_backbone_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"garbage\.pt"):
        create_backbone("resnet18", weights="file", checkpoint=path)


def test_lite0_classifier_keeps_imagenet_features_and_gets_a_new_head() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    classifier = create_classifier("lite0", 4).eval()
    normalised = (images - mean) / std
    with torch.no_grad():
        logits = classifier(images)
        features = classifier.model.forward_features(normalised)
        reference = pretrained_classifier().forward_features(normalised)
        head = classifier.model.forward_head(features)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    torch.testing.assert_close(features, reference)  # ImageNet weights kept
    torch.testing.assert_close(logits, head)  # the wrapper normalises [0, 1] input


def test_other_classifier_names_are_timm_architectures_from_scratch() -> None:
    classifier = create_classifier("resnet10t", 5)
    assert classifier.num_classes == 5
    assert not hasattr(classifier, "mean")  # no ImageNet statistics for a model that never saw them


def _hub_stand_in(monkeypatch, state: dict[str, torch.Tensor], folder: Path) -> list[str]:
    """timm's Hugging Face download replaced by a local file holding ``state``; returns the
    repositories timm asked for."""
    import safetensors.torch
    import timm.models._hub as hub

    asked: list[str] = []

    def download(repo_id, filename, **_):
        asked.append(repo_id)
        path = folder / filename
        if filename.endswith(".safetensors"):
            safetensors.torch.save_file(state, path)
        else:
            torch.save(state, path)
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    return asked


def test_hub_weights_go_through_timms_download_path(monkeypatch, tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = timm.create_model("resnet18", pretrained=False).state_dict()
    asked = _hub_stand_in(monkeypatch, reference, tmp_path)
    backbone = create_backbone("resnet18", weights="hub", out_indices=(2, 3))
    assert asked and asked[0] == "timm/resnet18.a1_in1k"
    assert torch.equal(backbone.model.conv1.weight, reference["conv1.weight"])
    assert backbone.channels == [128, 256]


def test_offline_hub_and_missing_packaged_weights_are_one_line_errors(monkeypatch) -> None:
    import timm.models._hub as hub

    def offline(*_, **__):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nretry later")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(BackboneError, match=r"^backbone 'resnet18': timm's hub download failed "
                       r"\(We couldn't connect[^\n]*feature-pretrained=file") as err:
        create_backbone("resnet18", weights="hub")
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneError, match=r"'wide_resnet50_2': no packaged weights.*hub"):
        create_backbone("wide_resnet50_2")
    with pytest.raises(BackboneError, match="feature-pretrained='imagenet'"):
        create_backbone("lite0", weights="imagenet")


@pytest.mark.parametrize("name", ["lite0", "resnet18"])
def test_folded_batchnorm_computes_the_same_features_without_batchnorm(name: str) -> None:
    weights = "packaged" if name == "lite0" else "none"
    backbone = create_backbone(name, weights=weights, out_indices=(1, 2, 3)).eval()
    folded = fold_batchnorm(backbone)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())  # untouched
    image = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ours, reference in zip(folded(image), backbone(image), strict=True):
            assert ours.shape == reference.shape
            assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


class _NormBeforeConv(torch.nn.Module):
    """Registers a conv then a batch norm but applies the norm first: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(3)
        self.norm.running_mean.fill_(0.5)
        self.norm.running_var.fill_(2.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(images))


def test_folding_a_module_that_applies_its_children_out_of_order_keeps_it() -> None:
    model = _NormBeforeConv()
    assert fold_batchnorm(model) is model
