"""The D-ADDA rule as a Flower strategy behind the reply guard: uploads that break eq. (3) are
refused and audited, the other sites' uploads still train the generators."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

import strategies.dadda
from fedad.dadda.generators import IMAGE_MODEL, MASK_MODEL, unpack_generators
from fedad.dadda.payload import build_upload, upload_to_record
from fedad.dadda.protocol import UPLOAD
from fedad.dadda.settings import DADDASettings
from fedad.data import load_image, scan_category
from strategies.dadda import DADDAUploadStrategy
from strategies.guard import GuardedStrategy

SIZE = 32
TYPES = ["good", "crack", "hole"]
SETTINGS = DADDASettings(dadda_diffusion_size=SIZE, dadda_unet_channels=8, dadda_unet_levels=2,
                         dadda_diffusion_steps=20, dadda_sample_steps=3,
                         dadda_train_iterations=2)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny MVTec-format category: 3 good training images, 2 cracks and 1 hole with masks."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, kind, count in [("train", "good", 3), ("test", "crack", 2), ("test", "hole", 1)]:
        (root / "part" / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "part" / split / kind / f"{i:03d}.png")
            if kind != "good":
                mask = np.zeros((48, 48), np.uint8)
                mask[10 + i : 20 + i, 5:30] = 255
                (root / "part" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "part" / "ground_truth" / kind
                                           / f"{i:03d}_mask.png")
    return scan_category(root, "part")


class UploadGrid(Grid):
    """Node i answers an upload query with ``replies[i]`` (a RecordDict, or an Error)."""

    def __init__(self, replies):
        self.replies = replies
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self):
        return list(self.replies)

    def send_and_receive(self, messages, *, timeout=None):
        answers = []
        for msg in messages:
            assert msg.metadata.message_type == UPLOAD.message
            answers.append(Message(self.replies[msg.metadata.dst_node_id], reply_to=msg))
        return answers

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def _forgeries(site):
    """The honest upload and three that break the rule (by node id)."""
    honest = build_upload(site, SIZE, TYPES)
    defect = next(s for s in site if s.defect_type != "good")
    defect_pixels = load_image(defect.image_path, SIZE).transpose(2, 0, 1)[None]
    labels = honest.image_labels.copy()
    labels[0] = 1
    masks = honest.masks.copy()
    masks[0, 0, 0] = 2
    return {
        1: honest,
        2: dataclasses.replace(honest, image_labels=labels),  # an image labelled defective
        3: dataclasses.replace(honest, masks=masks),  # a non-binary mask
        4: dataclasses.replace(  # one of the sender's defects, labelled normal
            honest, normal_images=np.concatenate([honest.normal_images, defect_pixels]),
            image_labels=np.zeros(len(honest.normal_images) + 1, np.int64)),
        5: honest,
    }


def _run(replies, monkeypatch):
    trained_on = []
    real = strategies.dadda.train_generators

    def spy(uploads, *args):
        trained_on.extend(uploads)
        return real(uploads, *args)

    monkeypatch.setattr(strategies.dadda, "train_generators", spy)
    strategy = DADDAUploadStrategy(SETTINGS, num_types=len(TYPES) - 1,
                                   upload_classes=len(TYPES), seed=0)
    guarded = GuardedStrategy(strategy, min_replies=1)
    result = guarded.start(grid=UploadGrid(replies), initial_arrays=ArrayRecord(), num_rounds=1)
    return strategy, guarded, result, trained_on


def test_uploads_breaking_the_rule_are_refused_and_audited_and_the_rest_train(site, monkeypatch):
    uploads = _forgeries(site)
    replies = {node: upload_to_record(upload) for node, upload in uploads.items()}
    replies[6] = Error(code=0, reason="site crashed")
    strategy, guarded, result, trained_on = _run(replies, monkeypatch)

    rows = {row["node"]: row for row in guarded.audit.rows}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[n]["accepted"] for n in range(1, 7)] == [True, False, False, False, True, False]
    assert "defective-label" in rows[2]["reason"]
    assert "binary-mask" in rows[3]["reason"]
    assert "defect-digest" in rows[4]["reason"]
    assert "site error" in rows[6]["reason"]
    assert all(rows[n]["kind"] == UPLOAD.message for n in rows)
    assert rows[1]["digest"] == rows[5]["digest"] and rows[1]["digest"] != rows[2]["digest"]
    assert rows[1]["details"]["masks"] == 3
    assert rows[4]["details"]["normal_images"] == len(uploads[1].normal_images) + 1

    # stage 2 trained on the two honest uploads only, and its result is both generators
    assert strategy.accepted == 2 and len(trained_on) == 2
    assert strategy.generator_stats["normal_images"] == 2 * len(uploads[1].normal_images)
    image_state, mask_state = unpack_generators(result.arrays)
    assert image_state and mask_state
    assert all(k.startswith((f"{IMAGE_MODEL}.", f"{MASK_MODEL}.")) for k in result.arrays)
    assert guarded.state_dict()["DADDAUploadStrategy"] == strategy.state_dict()


def test_no_generators_when_every_upload_is_refused(site, monkeypatch):
    forged = _forgeries(site)
    replies = {node: upload_to_record(forged[node]) for node in (2, 3)}
    strategy, guarded, result, trained_on = _run(replies, monkeypatch)
    assert not trained_on and strategy.accepted == 0
    assert not list(result.arrays.keys())
    assert [row["accepted"] for row in guarded.audit.rows] == [False, False]


def test_the_generators_do_not_depend_on_the_order_of_the_replies(site):
    honest = build_upload(site, SIZE, TYPES)
    other = dataclasses.replace(honest, normal_images=honest.normal_images[:2],
                                image_labels=honest.image_labels[:2])
    grid = UploadGrid({1: upload_to_record(honest), 2: upload_to_record(other)})
    strategy = DADDAUploadStrategy(SETTINGS, num_types=len(TYPES) - 1,
                                   upload_classes=len(TYPES), seed=0)
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), {}, grid))
    torch.manual_seed(0)  # the U-Nets are initialised from the global RNG, as before
    forward, _ = strategy.aggregate_train(1, replies)
    torch.manual_seed(0)
    backward, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert list(forward.keys()) == list(backward.keys())
    for key in forward:
        np.testing.assert_array_equal(forward[key].numpy(), backward[key].numpy())
