"""D-ADDA's diffusion U-Net, diffusion training/sampling, synthesis helpers and detector."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fedad.dadda.detector import DADDADetector, mask_centres, window_grid, windows_at
from fedad.dadda.diffusion import sample, train_diffusion
from fedad.dadda.settings import DADDASettings
from fedad.dadda.synthesis import DefectPairs, finetune_image_model, sample_masks
from fedad.models import create_model
from fedad.models.diffusion_unet import DiffusionUNet
from fedad.models.localizer import UNetLocalizer

TINY = DADDASettings(dadda_diffusion_size=32, dadda_unet_channels=8, dadda_unet_levels=2,
                     dadda_diffusion_steps=20, dadda_sample_steps=4, dadda_diffusion_batch=4,
                     dadda_warmup=2)


def _masks(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for m in masks:
        y, x = rng.integers(0, size - 8, 2)
        m[y:y + 8, x:x + 8] = 1
    return masks


def test_unet_shapes_and_registry() -> None:
    model = create_model("dadda_unet", **TINY.unet_kwargs(3))
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.tensor([1, 7])).shape == x.shape
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 7]))
    conditional = DiffusionUNet(**TINY.unet_kwargs(1, num_classes=3))
    with pytest.raises(ValueError, match="needs classes"):
        conditional(torch.randn(1, 1, 32, 32), torch.tensor([0]))


def test_attention_is_multi_head_in_intermediate_and_bottleneck_layers() -> None:
    model = DiffusionUNet(in_channels=3, image_size=64, base_channels=8, channel_mults=(1, 2, 2),
                          heads=4, head_dim=32)
    attended = [name for name, _ in model.named_modules() if name.endswith("attn")]
    # 64 px: levels at 64 and 32 px have none, 16 px and the bottleneck have one each way
    assert attended == ["down.2.attn", "mid_attn", "up.0.attn"]
    assert model.mid_attn.qkv.out_features == 3 * 4 * 32


def test_pretrained_image_model_loads_into_mask_conditioned_one_and_mask_matters() -> None:
    torch.manual_seed(0)
    unconditional = DiffusionUNet(**TINY.unet_kwargs(3))
    pairs = DefectPairs(np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32),
                        _masks(4), np.zeros(4, np.int64))
    settings = DADDASettings(**{**TINY.__dict__, "dadda_finetune_iterations": 2})
    model = finetune_image_model(unconditional.state_dict(), pairs, settings=settings, seed=0)
    assert model.mask_conditioning
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        a = model(x, t, mask=torch.from_numpy(_masks(1, seed=1)).float()[:, None])
        b = model(x, t, mask=torch.from_numpy(_masks(1, seed=2)).float()[:, None])
    assert not torch.allclose(a, b), "the output must depend on the conditioning mask"
    wrong = DiffusionUNet(**{**TINY.unet_kwargs(3), "base_channels": 16})
    with pytest.raises(ValueError, match="do not fit"):
        finetune_image_model(wrong.state_dict(), pairs, settings=settings, seed=0)


def test_diffusion_training_returns_ema_and_sampling_is_seeded() -> None:
    torch.manual_seed(0)
    model = DiffusionUNet(**TINY.unet_kwargs(1, num_classes=2))
    data = torch.from_numpy(_masks(6)).float()[:, None] * 2 - 1
    ema, stats = train_diffusion(model, data, settings=TINY, iterations=3, seed=0,
                                 classes=torch.tensor([0, 1] * 3))
    assert np.isfinite(stats["loss"]) and stats["seconds"] > 0
    raw, averaged = model.state_dict(), ema.state_dict()
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw), "EMA equals the raw weights"
    classes = torch.tensor([0, 1, 1])
    first = sample(ema, 3, settings=TINY, seed=3, classes=classes)
    again = sample(ema, 3, settings=TINY, seed=3, classes=classes)
    assert first.shape == (3, 1, 32, 32) and torch.equal(first, again)
    assert first.min() >= -1 and first.max() <= 1
    ancestral = DADDASettings(**{**TINY.__dict__, "dadda_sampler": "ddpm"})
    assert sample(ema, 1, settings=ancestral, seed=3, classes=classes[:1]).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        train_diffusion(model, data * 3, settings=TINY, iterations=1, seed=0,
                        classes=torch.tensor([0, 1] * 3))


def test_sampled_masks_are_binary_nonempty_and_classed() -> None:
    torch.manual_seed(0)
    model = DiffusionUNet(**TINY.unet_kwargs(1, num_classes=3)).eval()
    pairs = sample_masks(model, [0, 2], 2, settings=TINY, seed=0)
    assert set(np.unique(pairs.classes)) <= {0, 2}
    assert all(m.any() for m in pairs.masks) and set(np.unique(pairs.masks)) <= {0, 1}


def test_defect_pairs_roundtrip_and_checks(tmp_path) -> None:
    pairs = DefectPairs(np.full((2, 32, 32, 3), 0.5, np.float32), _masks(2),
                        np.array([1, 0], np.int64))
    pairs.save(tmp_path / "p.npz")
    loaded = DefectPairs.load(tmp_path / "p.npz")
    assert np.array_equal(loaded.masks, pairs.masks) and loaded.classes.tolist() == [1, 0]
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        DefectPairs(pairs.images * 3, pairs.masks, pairs.classes).check()
    with pytest.raises(FileNotFoundError, match="no synthetic pairs"):
        DefectPairs.load(tmp_path / "missing.npz")


def test_localizer_shapes() -> None:
    model = UNetLocalizer(base_channels=4, depth=3)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="multiple"):
        model(torch.rand(1, 3, 36, 36))


def test_settings_name_bad_keys() -> None:
    with pytest.raises(ValueError, match="dadda-synthesis"):
        DADDASettings(dadda_synthesis="gan")
    with pytest.raises(ValueError, match="dadda-sample-steps"):
        DADDASettings(dadda_sample_steps=500, dadda_diffusion_steps=100)
    with pytest.raises(ValueError, match="dadda-classifier='resnet-9000'"):
        DADDASettings(dadda_classifier="resnet-9000")


def test_detector_with_the_pretrained_lite0_classifier() -> None:
    detector = DADDADetector(3, classifier="lite0", localizer_channels=4).eval()
    with torch.no_grad():
        output = detector(torch.rand(2, 3, 32, 32))
    assert output.class_logits.shape == (2, 3)
    assert output.anomaly_logits.shape == (2, 1, 32, 32)


def test_ema_warm_up_follows_the_weights_early_and_caps_at_the_decay() -> None:
    from fedad.dadda.diffusion import ema_update

    update = ema_update(0.995)
    early = update(torch.zeros(1), torch.ones(1), torch.tensor(1))
    late = update(torch.zeros(1), torch.ones(1), torch.tensor(100000))
    assert early.item() > 0.5, "a short run's EMA must not stay at the initial weights"
    assert late.item() == pytest.approx(0.005)


def test_windows_at_cut_the_window_around_the_centre_inside_the_image() -> None:
    images = torch.rand(2, 3, 32, 32)
    centres = torch.tensor([[10.0, 20.0], [0.0, 31.0]])  # the second lies at the corner
    windows = windows_at(images, centres, fraction=0.25, side=8)
    assert windows.shape == (2, 3, 8, 8)
    assert torch.allclose(windows[0], images[0, :, 6:14, 16:24], atol=1e-6)
    assert torch.allclose(windows[1], images[1, :, 0:8, 24:32], atol=1e-6)


def test_window_grid_covers_the_image_edge_to_edge() -> None:
    grid = window_grid(64, 64, fraction=0.25, stride=0.125)  # 16 px windows, 8 px apart
    rows = sorted(set(grid[:, 0].tolist()))
    assert grid.shape == (49, 2) and rows[0] == 7.5 and rows[-1] == 55.5
    assert all(b - a <= 8 for a, b in itertools.pairwise(rows))
    assert window_grid(32, 32, fraction=1.0, stride=0.5).tolist() == [[15.5, 15.5]]


def test_mask_centres_pick_a_defect_pixel_or_any_pixel_of_a_normal_image() -> None:
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, 2:4, 11:13] = 1
    masks[1, 0, 9, 5] = 1
    centres = mask_centres(masks, torch.Generator().manual_seed(0))
    rows, cols = centres[:, 0].long(), centres[:, 1].long()
    assert masks[0, 0, rows[0], cols[0]] == 1 and centres[1].tolist() == [9.0, 5.0]
    normal = mask_centres(masks[2:].expand(200, -1, -1, -1), torch.Generator().manual_seed(0))
    assert normal.min() >= 0 and normal.max() <= 15 and len(set(map(tuple, normal.tolist()))) > 50


def test_windows_classifier_scores_each_type_by_its_most_confident_window() -> None:
    torch.manual_seed(0)
    detector = DADDADetector(3, classifier="resnet10t", localizer_channels=4,
                             window_fraction=0.25, window_stride=0.25).eval()
    images = torch.rand(2, 3, 32, 32)
    grid = window_grid(32, 32, 0.25, 0.25)
    with torch.no_grad():
        windows = torch.stack([detector.window_logits(images, c.expand(2, 2)) for c in grid], 1)
        output = detector(images)
        outside = images.clone()
        outside[:, :, :8, :8] = 0.0  # inside the first window, outside the last
        unchanged = detector.window_logits(outside, grid[-1].expand(2, 2))
    assert windows.shape == (2, len(grid), 4)  # K + 1 outputs: the last is "no defect"
    expected = windows.softmax(-1)[..., :3].amax(dim=1).log()
    assert output.class_logits.shape == (2, 3)
    assert torch.allclose(output.class_logits, expected, atol=1e-5)
    assert torch.allclose(unchanged, windows[:, -1], atol=1e-5)


def test_settings_name_bad_classifier_input() -> None:
    with pytest.raises(ValueError, match="dadda-classifier-input='mask'"):
        DADDASettings(dadda_classifier_input="mask")
    with pytest.raises(ValueError, match="dadda-window-fraction=0"):
        DADDASettings(dadda_window_fraction=0.0)
    with pytest.raises(ValueError, match="dadda-classifier-lr"):
        DADDASettings(dadda_classifier_lr=0.0)


def test_windows_training_labels_normal_images_no_defect() -> None:
    from fedad.dadda.detector import IGNORE, _training_output

    torch.manual_seed(0)
    detector = DADDADetector(3, classifier="resnet10t", localizer_channels=4,
                             window_fraction=0.25)
    masks = torch.zeros(2, 1, 32, 32)
    masks[1, 0, 4:6, 20:22] = 1
    output, targets = _training_output(detector, torch.rand(2, 3, 32, 32), masks,
                                       torch.tensor([IGNORE, 1]), torch.Generator())
    assert targets.tolist() == [3, 1]  # the normal image's window: class K = "no defect"
    assert output.class_logits.shape == (2, 4) and output.anomaly_logits.shape == (2, 1, 32, 32)
    whole = DADDADetector(3, classifier="resnet10t", localizer_channels=4)
    output, targets = _training_output(whole, torch.rand(2, 3, 32, 32), masks,
                                       torch.tensor([IGNORE, 1]), torch.Generator())
    assert targets.tolist() == [IGNORE, 1] and output.class_logits.shape == (2, 3)


def test_the_paper_config_builds_valid_cells_and_its_models_run_at_128_px() -> None:
    from fedad.bench.spec import load_spec
    from fedad.config import ExperimentConfig
    from fedad.dadda.detector import build_detector

    spec = load_spec(Path(__file__).resolve().parent.parent / "configs" / "dadda_paper.yaml")
    cells = spec.cells()
    assert len(cells) == 6  # DAM-only / D-ADDA x (centralized, label-wise, IID)
    settings = [ExperimentConfig.from_run_config(c.run_config).section(DADDASettings)
                for c in cells]
    assert {s.dadda_synthesis for s in settings} == {"dam-only", "dadda"}
    paper = settings[-1]
    assert (paper.dadda_diffusion_size, paper.dadda_diffusion_steps,
            paper.dadda_train_iterations, paper.dadda_warmup, paper.dadda_attention_heads,
            paper.dadda_head_dim) == (128, 1000, 30000, 5000, 4, 32)
    torch.manual_seed(0)
    x, t = torch.randn(1, 3, 128, 128), torch.tensor([999])
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 40:60, 50:90] = 1
    image_model = DiffusionUNet(**paper.unet_kwargs(3))  # G^I
    mask_model = DiffusionUNet(**paper.unet_kwargs(1, num_classes=4))  # G^M
    tuned = DiffusionUNet(**paper.unet_kwargs(3, mask_conditioning=True))  # stage 3's G^I
    with torch.no_grad():
        for output, target in ((image_model(x, t), x), (mask_model(x[:, :1], t, torch.tensor([2])),
                                                        x[:, :1]),
                               (tuned(x, t, mask=mask), x)):
            assert output.shape == target.shape and torch.isfinite(output).all()
        cfg = ExperimentConfig.from_run_config({**cells[-1].run_config, "category": "hex_nut"})
        detector = build_detector(cfg)
        out = detector(torch.rand(2, 3, 128, 128))
    assert out.class_logits.shape == (2, 5) and out.anomaly_logits.shape == (2, 1, 128, 128)
    diffusion_parameters = sum(p.numel() for m in (tuned, mask_model) for p in m.parameters())
    assert 0.6 * 48.3e6 < diffusion_parameters < 1.2 * 48.3e6  # the paper's 48.3 M
