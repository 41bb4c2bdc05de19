"""MSVT: shapes, frozen backbone, federated state, determinism, a tiny overfitting run."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from fedad.models import (
    create_model,
    list_models,
    load_trainable_state_dict,
    register_model,
    trainable_state_dict,
)
from fedad.msvt.model import MSVT, MSVTOutput

SMALL = dict(embed_dims=(32, 48, 64), depths=(1, 1, 1), num_heads=(1, 2, 2), decoder_dim=32,
             proj_dim=16)


def _model(seed: int = 0, **kwargs) -> MSVT:
    torch.manual_seed(seed)
    kwargs = {"image_size": 64, **SMALL, **kwargs}
    return MSVT(**kwargs)


def _defect_batch(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n textured images [n,3,size,size] with a bright square defect, and masks [n,1,size,size]."""
    generator = torch.Generator().manual_seed(0)
    images = 0.4 + 0.1 * torch.rand(n, 3, size, size, generator=generator)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        top, left = 8 + 10 * i, 40 - 8 * i
        masks[i, :, top:top + 12, left:left + 12] = 1
    images = images * (1 - masks) + torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1) * masks
    return images, masks


@pytest.mark.parametrize("backbone", ["lite0", "none"])
@pytest.mark.parametrize("image_size", [64, 128])
def test_output_shapes(backbone: str, image_size: int) -> None:
    model = create_model("msvt", image_size=image_size, backbone=backbone,
                         pretrained=backbone == "lite0").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert isinstance(out, MSVTOutput)
    assert out.anomaly_logits.shape == (2, 1, image_size, image_size)
    assert out.image_logit.shape == (2,)
    assert out.embedding.shape == (2, 128)


def test_four_stages_work() -> None:
    model = _model(image_size=64, embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1),
                   num_heads=(1, 1, 2, 2)).eval()
    assert len(model.stages) == 4
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).anomaly_logits.shape == (1, 1, 64, 64)


def test_bad_configuration_raises() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        _model(image_size=48)
    with pytest.raises(ValueError, match="three or more stages"):
        _model(embed_dims=(32, 48), num_heads=(1, 2), depths=(1, 1))


def test_wrong_input_shape_raises() -> None:
    model = _model().eval()
    for bad in (torch.rand(1, 3, 128, 128), torch.rand(1, 1, 64, 64), torch.rand(3, 64, 64)):
        with pytest.raises(AssertionError, match=r"\[B, 3, 64, 64\]"):
            model(bad)


def test_non_finite_input_is_caught() -> None:
    images = torch.rand(1, 3, 64, 64)
    images[0, 0, 10, 10] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        _model(backbone="none", pretrained=False).eval()(images)


def test_gradients_reach_trainable_parameters_only() -> None:
    model = _model().train()
    out = model(torch.rand(2, 3, 64, 64))
    (out.anomaly_logits.mean() + out.image_logit.sum() + out.embedding.sum()).backward()
    frozen = dict(model.stem.backbone.named_parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("stem.backbone.") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_frozen_backbone_stays_in_eval_mode() -> None:
    model = _model()
    model.train()
    assert model.training and model.stem.training and model.stages.training
    assert not any(m.training for m in model.stem.backbone.modules())
    stats = {k: v.clone() for k, v in model.stem.backbone.state_dict().items()}
    model(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(v, model.stem.backbone.state_dict()[k]) for k, v in stats.items())


def test_trainable_state_round_trip_excludes_backbone() -> None:
    source, target = _model(seed=0), _model(seed=1)
    source.train()(torch.rand(4, 3, 64, 64))  # move BN running stats away from their init
    state = trainable_state_dict(source)
    assert not any(k.startswith("stem.backbone.") for k in state)
    assert "stem.patch.weight" in state and "decoder_fuse.1.weight" in state
    num_trainable = sum(p.numel() for p in source.parameters() if p.requires_grad)
    num_params = sum(v.numel() for k, v in state.items() if "running" not in k
                     and "num_batches" not in k)
    assert num_params == num_trainable
    load_trainable_state_dict(target, state)
    images = torch.rand(2, 3, 64, 64)
    source.eval()
    target.eval()
    with torch.no_grad():
        a, b = source(images), target(images)
    assert torch.equal(a.anomaly_logits, b.anomaly_logits)
    assert torch.equal(a.image_logit, b.image_logit)
    assert torch.equal(a.embedding, b.embedding)


def test_trainable_state_loading_is_strict() -> None:
    model = _model()
    state = trainable_state_dict(model)
    missing = dict(state)
    del missing["stem.patch.weight"]
    with pytest.raises(ValueError, match=r"missing stem\.patch\.weight"):
        load_trainable_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected stem\.backbone\.x"):
        load_trainable_state_dict(model, {**state, "stem.backbone.x": torch.zeros(1)})
    wrong = {**state, "image_head.2.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"image_head\.2\.bias: shape \(2,\) != \(1,\)"):
        load_trainable_state_dict(model, wrong)


def test_same_seed_same_model_and_outputs() -> None:
    images = torch.rand(2, 3, 64, 64)
    outputs = []
    for _ in range(2):
        model = _model(seed=3, backbone="none", pretrained=False, drop_path=0.1).train()
        torch.manual_seed(4)
        outputs.append(model(images))
    assert torch.equal(outputs[0].anomaly_logits, outputs[1].anomaly_logits)
    assert torch.equal(outputs[0].embedding, outputs[1].embedding)


def test_overfits_a_square_defect() -> None:
    images, masks = _defect_batch()
    model = _model().train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(24):
        loss = F.binary_cross_entropy_with_logits(model(images).anomaly_logits, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_registry() -> None:
    assert "msvt" in list_models()
    with pytest.raises(ValueError, match=r"registered: .*msvt"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match="already registered"):
        register_model("msvt")(MSVT)


def test_stem_loads_a_local_timm_checkpoint(tmp_path):
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = MSVT(image_size=64, backbone="resnet18", depths=(1, 1, 1),
                 backbone_checkpoint=str(tmp_path / "resnet18.pth"))
    loaded = model.stem.backbone.model.state_dict()
    assert torch.equal(loaded["conv1.weight"], reference.state_dict()["conv1.weight"])
    assert model(torch.rand(1, 3, 64, 64)).anomaly_logits.shape == (1, 1, 64, 64)
