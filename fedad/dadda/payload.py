"""The privacy rule of D-ADDA, eq. (3): what a site may send to the server, typed and checked.

    D_server = {(I, y) | y = 0}  U  {(M, y) | y = 1}

A site uploads its normal images and the masks of its defects with their defect class; its
defective images never leave it. Each upload also carries content digests of the site's own
defective images (digests only, see :func:`image_digest`) so that the server can refuse an
"image" that is one of them.

Threat model, honestly:
- What fedad guarantees: a site running fedad's code builds its upload with
  :func:`build_upload`, which takes pixels only from samples labelled good and raises
  :class:`PrivacyViolation` for anything else; defective samples contribute their mask,
  class and digest only. This is the real protection: the code never uploads a defective image.
- What the server checks: every upload is parsed strictly (:func:`record_to_upload`: exactly
  the expected fields and dtypes) and :func:`check_upload` refuses what it can detect: an image
  labelled defective, an image equal to one of the sender's defective images (by digest), a
  non-binary or empty mask, a mask class out of range, non-finite or out-of-range pixels, wrong
  dtypes, shapes or sizes. A refused upload is not used. The server receives uploads through
  :class:`strategies.dadda.DADDAUploadStrategy`, whose reply guard writes every upload,
  accepted or not, to the run's audit log. This catches bugs and a site that bypasses
  ``build_upload`` but still reports its digests (a mislabelled or misconfigured client).
- What it cannot catch: a malicious site that lies about labels AND alters the pixels (or
  omits its digests) can upload a defective image, and no server-side test can tell a
  re-encoded defect photo from a normal one; nor can the server verify that masks belong to
  real defects. Against such a site only contracts and attestation of the site's code help.
- What does cross: masks (defect shape, size, location and class), which eq. (3) treats as
  non-sensitive, and normal images, which the paper notes may be sensitive too. The digests
  reveal no pixels, but a server that already holds an exact copy of a defect image can
  confirm the site has it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from PIL import Image

from fedad.data import load_image, load_mask
from fedad.data.mvtec import GOOD, Sample

log = logging.getLogger(__name__)

UPLOAD_ARRAYS = "dadda-upload"
UPLOAD_DIGESTS = "dadda-upload-digests"
DIGESTS_KEY = "defect-digests"
FIELD_DTYPES: dict[str, np.dtype] = {
    "normal-images": np.dtype(np.float32),
    "masks": np.dtype(np.uint8),
    "mask-classes": np.dtype(np.int64),
    "image-labels": np.dtype(np.int64),
}
"""Record key and exact dtype of each array of a :class:`ServerUpload`."""
DIGEST_SIDE = 64
"""Images are digested at this side, quantized to 8 bit."""


class PrivacyViolation(ValueError):  # noqa: N818 (a refusal, named as the rule's breach)
    """An upload breaks the privacy rule; ``rule`` names the check, the message says why."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"privacy rule '{rule}': {detail}")
        self.rule = rule


@dataclass(frozen=True)
class ServerUpload:
    """What one site sends to the server (eq. (3)).

    normal_images: float32 [N, 3, H, W] in [0, 1]; masks: uint8 [M, H', W'] in {0, 1};
    mask_classes: int64 [M], index into the dataset's defect types (>= 1, 0 is "good");
    image_labels: int64 [N], the sender's label of each normal image (must be 0);
    defect_digests: :func:`image_digest` of each of the sender's defective images.
    """

    normal_images: np.ndarray
    masks: np.ndarray
    mask_classes: np.ndarray
    image_labels: np.ndarray
    defect_digests: tuple[str, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by record key (see :data:`FIELD_DTYPES`)."""
        return {
            "normal-images": self.normal_images,
            "masks": self.masks,
            "mask-classes": self.mask_classes,
            "image-labels": self.image_labels,
        }


def image_digest(image: np.ndarray) -> str:
    """SHA-256 (hex) of ``image`` float [3, H, W] in [0, 1] quantized to 8 bit and resized to
    DIGEST_SIDE x DIGEST_SIDE (box filter). Equal pixels give equal digests, so the server can
    tell an uploaded image is one of the sender's defects; changes smaller than the 8-bit
    quantization of the box averages can go unnoticed, any larger change gives a new digest."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image_digest: expected [3, H, W], got {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("image_digest: non-finite values")
    quantized = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)
    resized = Image.fromarray(quantized).resize((DIGEST_SIDE, DIGEST_SIDE), Image.Resampling.BOX)
    return hashlib.sha256(b"fedad-image-v1" + np.asarray(resized).tobytes()).hexdigest()


def _normal_pixels(sample: Sample, image_size: int) -> np.ndarray:
    """float32 [3, S, S] of a good sample; PrivacyViolation for any other."""
    if sample.label != 0:
        raise PrivacyViolation(
            "defective-image", f"{sample.image_path}: a {sample.defect_type!r} image may not "
            "be uploaded (only good images cross to the server)"
        )
    return load_image(sample.image_path, image_size).transpose(2, 0, 1)


def build_upload(
    samples: Sequence[Sample], image_size: int, defect_types: Sequence[str]
) -> ServerUpload:
    """A site's upload: pixels of its good samples; of each defect only its mask, class and
    digest. Masks that vanish at ``image_size`` are left out (logged). The result is checked
    with :func:`check_upload` before it is returned.

    Args:
        samples: the site's samples (good and defective, e.g. its training share).
        image_size: side S of the uploaded images and masks.
        defect_types: the dataset's defect types, ``defect_types[0] == "good"``.
    """
    if not defect_types or defect_types[0] != GOOD:
        raise ValueError(f"defect_types must start with {GOOD!r}: {list(defect_types)}")
    classes = {name: index for index, name in enumerate(defect_types)}
    normal = [_normal_pixels(s, image_size) for s in samples if s.defect_type == GOOD]
    masks, mask_classes, digests = [], [], []
    for sample in (s for s in samples if s.defect_type != GOOD):
        if sample.defect_type not in classes:
            raise ValueError(f"{sample.image_path}: defect type {sample.defect_type!r} not in "
                             f"{list(defect_types)}")
        digests.append(image_digest(load_image(sample.image_path, image_size).transpose(2, 0, 1)))
        mask = load_mask(sample.mask_path, image_size)
        if not mask.any():
            log.warning("%s: mask has no defect pixel at %d px; not uploaded",
                        sample.mask_path, image_size)
            continue
        masks.append(mask.astype(np.uint8))
        mask_classes.append(classes[sample.defect_type])
    upload = ServerUpload(
        normal_images=np.stack(normal) if normal else np.zeros(
            (0, 3, image_size, image_size), np.float32),
        masks=np.stack(masks) if masks else np.zeros((0, image_size, image_size), np.uint8),
        mask_classes=np.asarray(mask_classes, dtype=np.int64),
        image_labels=np.zeros(len(normal), dtype=np.int64),
        defect_digests=tuple(digests),
    )
    check_upload(upload, num_classes=len(defect_types))
    return upload


def _check_types(upload: ServerUpload) -> None:
    for key, array in upload.arrays().items():
        if not isinstance(array, np.ndarray) or array.dtype != FIELD_DTYPES[key]:
            found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise PrivacyViolation("types", f"{key}: expected {FIELD_DTYPES[key]}, got {found}")
    digests = upload.defect_digests
    if not isinstance(digests, tuple) or not all(
        isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
        for d in digests
    ):
        raise PrivacyViolation("types", "defect-digests: expected a tuple of SHA-256 hex strings")


def _check_shapes(upload: ServerUpload, max_side: int) -> None:
    images, masks = upload.normal_images, upload.masks
    if images.ndim != 4 or images.shape[1] != 3:
        raise PrivacyViolation("shape", f"normal-images: expected [N, 3, H, W], got {images.shape}")
    if masks.ndim != 3:
        raise PrivacyViolation("shape", f"masks: expected [M, H, W], got {masks.shape}")
    if upload.image_labels.shape != (len(images),):
        raise PrivacyViolation("shape", f"image-labels {upload.image_labels.shape}: expected "
                               f"one label per image ({len(images)})")
    if upload.mask_classes.shape != (len(masks),):
        raise PrivacyViolation("shape", f"mask-classes {upload.mask_classes.shape}: expected "
                               f"one class per mask ({len(masks)})")
    for key, sides in (("normal-images", images.shape[2:]), ("masks", masks.shape[1:])):
        if not all(1 <= side <= max_side for side in sides):
            raise PrivacyViolation("shape", f"{key}: sides {sides} not in [1, {max_side}]")
    if len(images) and any(m > i for m, i in zip(masks.shape[1:], images.shape[2:], strict=True)):
        raise PrivacyViolation("shape", f"masks {masks.shape[1:]} larger than the images "
                               f"{images.shape[2:]}")


def check_upload(
    upload: ServerUpload, *, max_side: int = 1024, num_classes: int | None = None
) -> None:
    """Raise :class:`PrivacyViolation` naming the first rule ``upload`` breaks.

    Rules, in order: ``types`` (exact dtypes, digests are SHA-256 hex), ``shape`` (layouts,
    one label per image and one class per mask, sides in [1, max_side], masks no larger than
    the images), ``finite`` and ``range`` (pixels finite, in [0, 1]), ``defective-label`` (an
    image not labelled 0), ``binary-mask``, ``empty-mask``, ``mask-class`` (>= 1 and, when
    ``num_classes`` is given, < num_classes), ``defect-digest`` (an image whose
    :func:`image_digest` is one of the sender's defective images').
    """
    _check_types(upload)
    _check_shapes(upload, max_side)
    images, masks = upload.normal_images, upload.masks
    if not np.isfinite(images).all():
        raise PrivacyViolation("finite", "normal-images: non-finite values")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise PrivacyViolation("range", "normal-images: values outside [0, 1]")
    labelled = np.flatnonzero(upload.image_labels != 0)
    if labelled.size:
        raise PrivacyViolation("defective-label", f"images {labelled[:5].tolist()} are labelled "
                               "defective; only normal images (label 0) may be uploaded")
    if masks.size and masks.max() > 1:
        raise PrivacyViolation("binary-mask", f"masks: values {np.unique(masks)[:6].tolist()}; "
                               "expected 0 and 1")
    empty = np.flatnonzero(masks.max(axis=(1, 2), initial=0) == 0)
    if empty.size:
        raise PrivacyViolation("empty-mask", f"masks {empty[:5].tolist()} have no defect pixel")
    classes = upload.mask_classes
    upper = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((classes < 1) | (classes >= upper))
    if bad.size:
        raise PrivacyViolation("mask-class", f"mask classes {classes[bad[:5]].tolist()} not in "
                               f"[1, {upper - 1}] (0 is 'good')")
    forbidden = set(upload.defect_digests)
    for index, image in enumerate(images):
        if image_digest(image) in forbidden:
            raise PrivacyViolation("defect-digest", f"normal-images[{index}] equals one of the "
                                   "sender's defective images")


def upload_to_record(upload: ServerUpload) -> RecordDict:
    """The upload as a Flower RecordDict: one ArrayRecord of the arrays, one ConfigRecord of
    the digests."""
    arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v))
                                     for k, v in upload.arrays().items()})
    digests = ConfigRecord({DIGESTS_KEY: list(upload.defect_digests)})
    return RecordDict({UPLOAD_ARRAYS: arrays, UPLOAD_DIGESTS: digests})


def record_to_upload(content: RecordDict) -> ServerUpload:
    """Parse a received RecordDict strictly: exactly the records, keys and dtypes that
    :func:`upload_to_record` writes; PrivacyViolation ("fields" or "types") otherwise."""
    if set(content.keys()) != {UPLOAD_ARRAYS, UPLOAD_DIGESTS}:
        raise PrivacyViolation("fields", f"records {sorted(content.keys())}: expected "
                               f"{sorted([UPLOAD_ARRAYS, UPLOAD_DIGESTS])}")
    arrays, digests = content[UPLOAD_ARRAYS], content[UPLOAD_DIGESTS]
    if not isinstance(arrays, ArrayRecord) or not isinstance(digests, ConfigRecord):
        raise PrivacyViolation("types", f"{UPLOAD_ARRAYS} must be an ArrayRecord and "
                               f"{UPLOAD_DIGESTS} a ConfigRecord")
    if set(arrays.keys()) != set(FIELD_DTYPES) or set(digests.keys()) != {DIGESTS_KEY}:
        raise PrivacyViolation("fields", f"arrays {sorted(arrays.keys())} and config "
                               f"{sorted(digests.keys())}: expected {sorted(FIELD_DTYPES)} and "
                               f"['{DIGESTS_KEY}']")
    values = {}
    for key, dtype in FIELD_DTYPES.items():
        array = arrays[key]
        try:
            values[key] = array.numpy()
        except (TypeError, ValueError, EOFError, OSError) as err:
            raise PrivacyViolation("types", f"{key}: not a numpy array ({err})") from None
        if values[key].dtype != dtype:
            raise PrivacyViolation("types", f"{key}: expected {dtype}, got {values[key].dtype}")
    listed = digests[DIGESTS_KEY]
    if not isinstance(listed, list) or not all(isinstance(d, str) for d in listed):
        raise PrivacyViolation("types", f"{DIGESTS_KEY}: expected a list of strings")
    return ServerUpload(
        normal_images=values["normal-images"], masks=values["masks"],
        mask_classes=values["mask-classes"], image_labels=values["image-labels"],
        defect_digests=tuple(listed),
    )


def inspect_upload(content: RecordDict, *, max_side: int = 1024,
                   num_classes: int | None = None) -> tuple[ServerUpload | None, str | None]:
    """Server side: parse and check one site's payload. Returns (upload, None) when it may be
    used, else (the parsed upload or None when it could not be parsed, the broken rule)."""
    upload = None
    try:
        upload = record_to_upload(content)
        check_upload(upload, max_side=max_side, num_classes=num_classes)
    except PrivacyViolation as err:
        return upload, str(err)
    return upload, None


def upload_details(upload: ServerUpload | None) -> dict[str, object]:
    """What the audit log records of an upload beyond its digest: image and mask counts and
    shapes, masks per class, number of defect digests (empty when it could not be parsed)."""
    if upload is None:
        return {}
    try:
        classes, counts = np.unique(np.asarray(upload.mask_classes), return_counts=True)
        return {
            "normal_images": len(upload.normal_images), "masks": len(upload.masks),
            "image_shape": list(np.shape(upload.normal_images)[1:]),
            "mask_shape": list(np.shape(upload.masks)[1:]),
            "mask_classes": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
            "defect_digests": len(upload.defect_digests),
        }
    except (TypeError, ValueError) as err:  # too malformed to describe
        return {"unreadable": type(err).__name__}
