"""The eq. (3) privacy rule: only normal images and defect masks cross; the server refuses and
audits everything else it can detect."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from PIL import Image

from fedad.dadda.payload import (
    UPLOAD_ARRAYS,
    UPLOAD_DIGESTS,
    PrivacyViolation,
    ServerUpload,
    _normal_pixels,
    build_upload,
    check_upload,
    image_digest,
    record_to_upload,
    upload_to_record,
)
from fedad.data import load_image, scan_category

SIZE = 32
TYPES = ["good", "crack", "hole"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny MVTec-format category: 3 good images, 2 cracks and 1 hole with masks."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    folder = root / "part"
    for split, kind, count in [("train", "good", 3), ("test", "good", 1),
                               ("test", "crack", 2), ("test", "hole", 1)]:
        (folder / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / split / kind / f"{i:03d}.png")
            if kind != "good":
                mask = np.zeros((48, 48), np.uint8)
                mask[10 + i : 20 + i, 5:30] = 255
                (folder / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(folder / "ground_truth" / kind / f"{i:03d}_mask.png")
    return scan_category(root, "part")


@pytest.fixture()
def upload(site):
    return build_upload(site, SIZE, TYPES)


def _chw(sample):
    return load_image(sample.image_path, SIZE).transpose(2, 0, 1)


def test_build_upload_sends_only_good_pixels_and_the_masks_of_defects(site, upload):
    good = [s for s in site if s.defect_type == "good"]
    defects = [s for s in site if s.defect_type != "good"]
    assert upload.normal_images.shape == (len(good), 3, SIZE, SIZE)
    assert {image_digest(i) for i in upload.normal_images} == {image_digest(_chw(s)) for s in good}
    assert set(upload.defect_digests) == {image_digest(_chw(s)) for s in defects}
    assert not set(upload.defect_digests) & {image_digest(i) for i in upload.normal_images}
    assert upload.masks.shape == (len(defects), SIZE, SIZE) and upload.masks.dtype == np.uint8
    assert sorted(upload.mask_classes.tolist()) == [1, 1, 2]
    assert (upload.image_labels == 0).all()


def test_a_defective_sample_never_reaches_the_normal_images(site):
    defect = next(s for s in site if s.defect_type != "good")
    with pytest.raises(PrivacyViolation, match="defective-image"):
        _normal_pixels(defect, SIZE)
    only_defects = build_upload([s for s in site if s.defect_type != "good"], SIZE, TYPES)
    assert len(only_defects.normal_images) == 0 and len(only_defects.masks) == 3


def test_a_site_without_defects_uploads_only_normal_images(site):
    good_only = build_upload([s for s in site if s.defect_type == "good"], SIZE, TYPES)
    assert good_only.masks.shape == (0, SIZE, SIZE) and good_only.defect_digests == ()
    back = record_to_upload(upload_to_record(good_only))
    check_upload(back, num_classes=len(TYPES))
    assert back.masks.shape == (0, SIZE, SIZE) and len(back.normal_images) == 4


def test_record_round_trip_preserves_the_upload(upload):
    back = record_to_upload(upload_to_record(upload))
    for name in ("normal_images", "masks", "mask_classes", "image_labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(upload, name))
        assert getattr(back, name).dtype == getattr(upload, name).dtype
    assert back.defect_digests == upload.defect_digests


def _mutate(upload, **changes):
    return dataclasses.replace(upload, **changes)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


VIOLATIONS = {
    "defective-label": lambda u: _mutate(u, image_labels=_with(u.image_labels, 0, 1)),
    "binary-mask": lambda u: _mutate(u, masks=_with(u.masks, (0, 0, 0), 2)),
    "empty-mask": lambda u: _mutate(u, masks=_with(u.masks, 1, 0)),
    "mask-class": lambda u: _mutate(u, mask_classes=_with(u.mask_classes, 0, 0)),
    "finite": lambda u: _mutate(u, normal_images=_with(u.normal_images, (0, 0, 0, 0), np.nan)),
    "range": lambda u: _mutate(u, normal_images=_with(u.normal_images, (0, 0, 0, 0), 1.5)),
    "types": lambda u: _mutate(u, normal_images=u.normal_images.astype(np.float64)),
    "shape": lambda u: _mutate(u, normal_images=u.normal_images.transpose(0, 2, 3, 1).copy()),
}


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_each_rule_refuses_its_violation(upload, rule):
    check_upload(upload, num_classes=len(TYPES))  # the honest upload passes
    with pytest.raises(PrivacyViolation, match=f"'{rule}'") as caught:
        check_upload(VIOLATIONS[rule](upload), num_classes=len(TYPES))
    assert caught.value.rule == rule


@pytest.mark.parametrize("forge, rule", [
    (lambda u: _mutate(u, mask_classes=_with(u.mask_classes, 0, 3)), "mask-class"),
    (lambda u: _mutate(u, defect_digests=("not-a-digest",)), "types"),
    (lambda u: _mutate(u, image_labels=u.image_labels[:-1]), "shape"),
    (lambda u: _mutate(u, mask_classes=u.mask_classes[:-1]), "shape"),
    (lambda u: _mutate(u, masks=np.ones((3, SIZE + 8, SIZE), np.uint8)), "shape"),
])
def test_counts_sizes_classes_and_digests_are_consistent(upload, forge, rule):
    with pytest.raises(PrivacyViolation, match=f"'{rule}'"):
        check_upload(forge(upload), num_classes=len(TYPES))


def test_images_larger_than_max_side_are_refused(upload):
    with pytest.raises(PrivacyViolation, match="'shape'"):
        check_upload(upload, max_side=SIZE - 1)


def test_strict_parsing_refuses_missing_extra_and_mistyped_fields(upload):
    record = upload_to_record(upload)
    extra = RecordDict({**dict(record.items()), "features": ConfigRecord({"x": 1})})
    with pytest.raises(PrivacyViolation, match="'fields'"):
        record_to_upload(extra)
    arrays = dict(record[UPLOAD_ARRAYS].items())
    arrays.pop("masks")
    missing = RecordDict({UPLOAD_ARRAYS: ArrayRecord(array_dict=arrays),
                          UPLOAD_DIGESTS: record[UPLOAD_DIGESTS]})
    with pytest.raises(PrivacyViolation, match="'fields'"):
        record_to_upload(missing)
    mistyped = upload_to_record(_mutate(upload, masks=upload.masks.astype(np.float32)))
    with pytest.raises(PrivacyViolation, match="'types'"):
        record_to_upload(mistyped)
    arrays = dict(record[UPLOAD_ARRAYS].items())
    arrays["masks"] = Array(dtype="uint8", shape=(2,), stype="numpy.ndarray", data=b"garbage")
    garbled = RecordDict({UPLOAD_ARRAYS: ArrayRecord(array_dict=arrays),
                          UPLOAD_DIGESTS: record[UPLOAD_DIGESTS]})
    with pytest.raises(PrivacyViolation, match="'types'"):
        record_to_upload(garbled)


def test_image_digest_tells_equal_from_changed_images(site):
    image = _chw(site[0])
    assert image_digest(image) == image_digest(image.copy())
    changed = image.copy()
    changed[:, :8, :8] = 1.0 - changed[:, :8, :8]
    assert image_digest(changed) != image_digest(image)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        image_digest(image.transpose(1, 2, 0))


def test_server_upload_is_frozen(upload):
    with pytest.raises(dataclasses.FrozenInstanceError):
        upload.image_labels = np.ones(3, np.int64)
    assert isinstance(upload, ServerUpload)
