"""The one smoothing function and its one setting, map-sigma, for every method."""

import numpy as np
import pytest
import torch

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.experiment import prepare_data
from fedad.models.anomaly_map import MapSettings, smooth_maps
from fedad.msvt.training import MSVT_RECIPE


def test_each_method_keeps_its_own_sigma_unless_map_sigma_is_set():
    own = MapSettings()
    assert own.sigma("msvt", 128) == 2.0 and own.sigma("msvt", 256) == 4.0
    assert own.sigma("mae", 128) == 4.0 and own.sigma("dadda", 64) == 1.0
    assert own.sigma("memorybank", 224) == 2.0  # the heads: pixels at any size
    for method in ("msvt", "mae", "dadda", "gmm"):
        assert MapSettings(map_sigma=3.0).sigma(method, 224) == 3.0
    with pytest.raises(ConfigError, match="map-sigma=-2"):
        ExperimentConfig.from_run_config({"map-sigma": -2}).section(MapSettings)


def test_smooth_maps_keeps_shape_and_dtype_and_zero_means_none():
    maps = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    smoothed = smooth_maps(maps, 1.5)
    assert smoothed.shape == maps.shape and smoothed.dtype == maps.dtype
    assert smoothed.std() < maps.std()
    assert smooth_maps(maps, 0.0) is maps


def test_map_sigma_reaches_a_one_model_method(tmp_path):
    data = generate_dataset(tmp_path / "data", categories=["washer"], num_train=4,
                            num_test_good=1, num_test_per_defect=1)
    base = {"data-path": str(data), "category": "washer", "image-size": 64, "backbone": "none"}
    samples = prepare_data(ExperimentConfig.from_run_config(base), 1).samples(-1, "test")[:3]
    torch.manual_seed(0)
    model = MSVT_RECIPE.build(ExperimentConfig.from_run_config(base))

    def maps(**setting):
        cfg = ExperimentConfig.from_run_config({**base, **setting})
        return MSVT_RECIPE.predict(model, samples, cfg, None).maps

    np.testing.assert_array_equal(maps(), maps(**{"map-sigma": 1.0}))  # 2 px at 128 = 1 at 64
    assert not np.allclose(maps(**{"map-sigma": 0.0}), maps(**{"map-sigma": 4.0}))
