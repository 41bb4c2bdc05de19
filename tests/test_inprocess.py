"""The in-process grid applies the ClientApp's mods: under ``dp=client-fixed`` a site's update
arrives clipped to the norm the server sent, as it does through a real ClientApp."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from fedad.config import ExperimentConfig
from fedad.data import generate_dataset
from fedad.inprocess import FIRST_NODE_ID, InProcessGrid
from fedad.privacy import CLIENT_MODS
from fedad.task import build_model, model_to_arrays

CLIPPING_NORM = 0.01


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=8, num_test_good=2, num_test_per_defect=1, image_size=64)


def _update_norm(data_path, dp: str) -> float:
    """Norm of (site 0's reply - global arrays) after one tiny local training under ``dp``."""
    cfg = ExperimentConfig.from_run_config({
        "data-path": str(data_path), "category": "washer", "image-size": 64, "backbone": "none",
        "local-epochs": 1, "max-train-batches": 1, "batch-size": 4, "val-fraction": 0.0,
        "dp": dp, "dp-noise-multiplier": 0.0, "dp-clipping-norm": CLIPPING_NORM})
    grid = InProcessGrid(cfg, 2)
    arrays = model_to_arrays(build_model(cfg))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "clipping_norm": CLIPPING_NORM})})  # what Flower's DP wrapper sends
    [reply] = grid.send_and_receive(
        [grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID, "1")])
    assert not reply.has_error(), reply.error
    returned = reply.content.array_records["arrays"]
    return float(np.sqrt(sum(
        np.sum((returned[key].numpy().astype(np.float64) - arrays[key].numpy()) ** 2)
        for key in arrays)))


def test_client_side_clipping_applies_in_process(data_path):
    assert _update_norm(data_path, "none") > 10 * CLIPPING_NORM
    # float32 arrays: global + clipped update is rounded, hence the small tolerance
    assert _update_norm(data_path, "client-fixed") <= CLIPPING_NORM * 1.001


def test_the_client_app_applies_the_same_mods():
    import client_app

    assert client_app.app._mods == list(CLIENT_MODS)
