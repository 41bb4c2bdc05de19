"""DAM (D-ADDA stage 1, Algorithm 1): mask growth, alignment, the eq. (4) retry rule, outputs."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from fedad.config import ConfigError, ExperimentConfig
from fedad.dam import DAMSettings, DefectAugmenter, augment_defects, category_kind
from fedad.dam.alignment import clamp_shift, estimate_shift, random_shift, shift_image, to_gray
from fedad.dam.compose import match_colours
from fedad.dam.masks import defective_superpixels, select_nearest, smooth_mask
from fedad.dam.plots import plot_dam_examples
from fedad.dam.quality import SSIMReferences
from fedad.dam.superpixels import SuperpixelMap

SIZE = 48


def _grid_superpixels(size=64, block=8):
    """A synthetic superpixel map: (size/block)^2 square blocks."""
    rows, cols = np.indices((size, size)) // block
    return SuperpixelMap.from_labels(rows * (size // block) + cols)


def _texture(rng, n):
    """Smooth random colour textures [n, S, S, 3] in [0, 1]."""
    noise = ndimage.gaussian_filter(rng.random((n, SIZE, SIZE, 3)), (0, 2, 2, 0))
    return ((noise - noise.min()) / np.ptp(noise)).astype(np.float32)


def _object_images(rng, n, centre=(24, 24)):
    """A bright ring-and-bar object on a dark noisy background, [n, S, S, 3]."""
    rows, cols = np.indices((SIZE, SIZE))
    radius = np.hypot(rows - centre[0], cols - centre[1])
    shape = ((radius < 14) & (radius > 6)) | ((abs(rows - centre[0]) < 2) & (radius < 18))
    base = np.where(shape[..., None], [0.8, 0.7, 0.3], [0.15, 0.2, 0.25])
    return np.clip(base + rng.normal(0, 0.03, (n, SIZE, SIZE, 3)), 0, 1).astype(np.float32)


def _defects(images, rng):
    """A dark blob pasted into each image, and its mask."""
    masks = np.zeros(images.shape[:3], np.uint8)
    out = images.copy()
    for i in range(len(images)):
        r, c = rng.integers(12, SIZE - 12, 2)
        masks[i, r - 3 : r + 3, c - 4 : c + 4] = 1
        out[i][masks[i] == 1] = 0.02
    return out, masks


@pytest.fixture(scope="module")
def texture_data():
    rng = np.random.default_rng(0)
    normal = _texture(rng, 4)
    defect, masks = _defects(_texture(rng, 3), rng)
    return normal, defect, masks


@pytest.fixture(scope="module")
def object_data():
    rng = np.random.default_rng(1)
    normal = _object_images(rng, 4)
    defect, masks = _defects(_object_images(rng, 3), rng)
    return normal, defect, masks


def test_settings_defaults_are_the_papers_and_bad_values_name_the_key():
    settings = DAMSettings()
    assert settings.p_range("texture") == (0.35, 0.65)
    assert settings.p_range("object") == (0.65, 0.85)
    assert settings.dam_quality_tries == 100
    cfg = ExperimentConfig.from_run_config({"dam-p-object-low": 0.9, "dam-p-object-high": 0.8})
    with pytest.raises(ConfigError, match="dam-p-object-low"):
        cfg.section(DAMSettings)
    cfg = ExperimentConfig.from_run_config({"dam-quality-tries": 5})
    assert cfg.section(DAMSettings).dam_quality_tries == 5


def test_category_kind_covers_mvtec_and_synthetic_and_honours_overrides():
    assert category_kind("carpet") == "texture" and category_kind("hazelnut") == "object"
    assert category_kind("brick") == "texture" and category_kind("hex_nut") == "object"
    assert sum(category_kind(c) == "texture" for c in (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")) == 5
    settings = DAMSettings(dam_category_kinds="widget=object, carpet=object")
    assert category_kind("widget", settings=settings) == "object"
    assert category_kind("carpet", settings=settings) == "object"
    with pytest.raises(ValueError, match="dam-category-kinds"):
        category_kind("widget")
    with pytest.raises(ValueError, match="dam-category-kinds"):
        DAMSettings(dam_category_kinds="widget=metal")


def test_defective_superpixels_are_the_overlapping_ones_grown_by_adjacent_ones():
    grid = _grid_superpixels()
    mask = np.zeros((64, 64), bool)
    mask[20:22, 20:22] = True  # inside block (2, 2) = label 18
    assert np.flatnonzero(defective_superpixels(grid, mask, rings=0)).tolist() == [18]
    grown = np.flatnonzero(defective_superpixels(grid, mask, rings=1)).tolist()
    assert grown == [10, 17, 18, 19, 26]  # 4-neighbours share an edge, diagonals do not
    with pytest.raises(ValueError, match="empty"):
        defective_superpixels(grid, np.zeros((64, 64), bool), rings=1)


@pytest.mark.parametrize("low, high", [(0.35, 0.65), (0.65, 0.85)])
def test_mask_growth_fraction_lies_in_the_configured_range(low, high):
    grid = _grid_superpixels()
    candidates = np.zeros(grid.count, bool)
    candidates[[r * 8 + c for r in range(1, 7) for c in range(1, 7)]] = True  # 36 blocks
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(200):
        chosen = select_nearest(grid, candidates, rng.uniform(low, high), rng)
        assert not (chosen & ~candidates).any()
        fractions.append(chosen.sum() / candidates.sum())
        # the chosen ones are the nearest to one of them (the target): a ball in the pool
        inside = grid.centroids[chosen]
        outside = grid.centroids[candidates & ~chosen]
        if len(outside):
            gaps = [np.linalg.norm(outside - t, axis=1).min() - np.linalg.norm(
                inside - t, axis=1).max() for t in inside]
            assert max(gaps) >= 0
    half_step = 0.5 / candidates.sum()
    assert low - half_step <= min(fractions) and max(fractions) <= high + half_step
    assert max(fractions) - min(fractions) > 0.5 * (high - low)  # p really varies


def test_smoothing_rounds_corners_and_never_empties_a_mask():
    square = np.zeros((32, 32), bool)
    square[8:20, 8:20] = True
    smooth = smooth_mask(square, 2.0)
    assert not smooth[8, 8] and smooth[14, 14]
    dot = np.zeros((32, 32), bool)
    dot[5, 5] = True
    assert smooth_mask(dot, 2.0).sum() == 1


def test_alignment_recovers_a_known_shift_for_objects():
    rng = np.random.default_rng(3)
    original = _object_images(rng, 1)[0]
    for shift in [(5, -3), (-4, 6), (0, 0)]:
        moved = shift_image(original, shift, fill="edge")
        assert estimate_shift(to_gray(moved), to_gray(original), 0.5) == shift


def test_shifts_keep_the_defect_inside_the_frame():
    mask = np.zeros((32, 32), bool)
    mask[2:6, 25:30] = True
    assert clamp_shift(mask, (-10, 10)) == (-2, 2)
    rng = np.random.default_rng(0)
    shifts = [random_shift(mask, 0.5, rng) for _ in range(200)]
    for shift in shifts:
        assert shift_image(mask, shift, fill="zero").sum() == mask.sum()
    rows = np.array([dy for dy, _ in shifts])
    assert rows.min() == -2 and rows.max() == 16  # the whole allowed range is reached...
    assert np.mean(rows == -2) < 0.2  # ...without piling up at the border it cannot cross


def test_batched_ssim_equals_skimage():
    rng = np.random.default_rng(0)
    references = _texture(rng, 3)
    candidate = _texture(rng, 1)[0]
    expected = [structural_similarity(to_gray(candidate), to_gray(r), data_range=1.0)
                for r in references]
    np.testing.assert_allclose(SSIMReferences(references).scores(candidate), expected, atol=1e-4)


def test_colour_matching_keeps_a_dark_defect_dark():
    rng = np.random.default_rng(0)
    bright = np.clip(_texture(rng, 1)[0] * 0.3 + 0.6, 0, 1)
    defective, masks = _defects(bright[None], rng)
    dull = _texture(rng, 1)[0] * 0.5
    matched = match_colours(defective[0], dull)
    hole = to_gray(matched)[masks[0] == 1]
    rest = to_gray(matched)[masks[0] == 0]
    assert abs(rest.mean() - to_gray(dull).mean()) < 0.05  # lighting matched to the normal
    assert hole.max() <= np.quantile(rest, 0.05)  # the defect is still among the darkest


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_outputs_have_the_right_shapes_ranges_and_provenance(kind, texture_data, object_data):
    normal, defect, masks = texture_data if kind == "texture" else object_data
    augmenter = DefectAugmenter(normal, defect, masks, kind=kind)
    low, high = augmenter.settings.p_range(kind)
    for sample in augmenter.generate(4, seed=0):
        assert sample.image.shape == (SIZE, SIZE, 3) and sample.image.dtype == np.float32
        assert sample.mask.shape == (SIZE, SIZE) and sample.mask.dtype == np.uint8
        assert set(np.unique(sample.mask)) == {0, 1}
        assert sample.image.min() >= 0 and sample.image.max() <= 1
        assert low <= sample.fraction <= high and 1 <= sample.tries <= 100
        outside = sample.mask == 0  # only the masked pixels were replaced
        np.testing.assert_array_equal(sample.image[outside], normal[sample.normal_index][outside])
        assert not np.array_equal(sample.image, normal[sample.normal_index])
    images, out_masks = augment_defects(normal, defect, masks, count=3, kind=kind, seed=1)
    assert images.shape == (3, SIZE, SIZE, 3) and out_masks.shape == (3, SIZE, SIZE)


def test_deterministic_by_seed(texture_data):
    normal, defect, masks = texture_data
    settings = DAMSettings(dam_quality_tries=5)
    a, b, c = (augment_defects(normal, defect, masks, count=3, kind="texture", seed=seed,
                               settings=settings) for seed in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


class _ScriptedRule:
    """Stands in for eq. (4): fails until try ``pass_at`` (never when 0), records each try."""

    def __init__(self, pass_at):
        self.pass_at = pass_at
        self.tried = []

    def passes(self, image, normal_index, defect_index):
        self.tried.append(image.copy())
        return len(self.tried) == self.pass_at


@pytest.mark.parametrize("pass_at", [0, 3])
def test_quality_rule_retries_then_keeps_the_last_try(pass_at, object_data):
    normal, defect, masks = object_data
    augmenter = DefectAugmenter(normal, defect, masks, kind="object")
    rule = _ScriptedRule(pass_at)
    augmenter.quality = rule
    sample = augmenter.sample(np.random.default_rng(0))
    expected_tries = pass_at or augmenter.settings.dam_quality_tries
    assert len(rule.tried) == sample.tries == expected_tries
    assert sample.passed == bool(pass_at)
    np.testing.assert_array_equal(sample.image, rule.tried[-1])
    assert len({t.tobytes() for t in rule.tried}) > 1  # each try draws a new mask


def test_bad_inputs_are_refused_with_the_argument_named(texture_data):
    normal, defect, masks = texture_data
    empty = masks.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match="defect_masks"):
        augment_defects(normal, defect, empty, count=1, kind="texture", seed=0)
    with pytest.raises(ValueError, match="normal_images"):
        augment_defects(normal * 2, defect, masks, count=1, kind="texture", seed=0)
    with pytest.raises(ValueError, match="kind"):
        augment_defects(normal, defect, masks, count=1, kind="fabric", seed=0)


def test_plot_dam_examples_writes_a_png(tmp_path, object_data):
    normal, defect, masks = object_data
    path = plot_dam_examples(normal, defect, masks, tmp_path / "dam.png", kind="object", count=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
