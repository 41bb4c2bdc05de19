"""Experiment data resolution: categories, manifest determinism, errors that name the setting."""

import pytest

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.experiment import dataset_categories, prepare_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["brick", "washer"],
                            num_train=8, num_test_good=3, num_test_per_defect=3)


def test_manifest_is_deterministic_and_covers_every_sample(root):
    cfg = ExperimentConfig(data_path=str(root), category="washer", partitioner="label-wise")
    a = prepare_data(cfg, 2).manifest
    b = prepare_data(cfg.replace(seed=0, lr=0.5), 2).manifest  # other training settings
    assert a.equals(b)
    assert len(a) == 8 + 3 + 3 * 5  # every image once: train goods, test goods, defects
    assert set(a.loc[a["partition"] >= 0, "role"]) <= {"train", "val"}


def test_by_category_uses_every_category_when_none_is_named(root):
    data = prepare_data(ExperimentConfig(data_path=str(root), partitioner="by-category"), 2)
    assert data.categories == ("brick", "washer")
    per_client = data.manifest[data.manifest["partition"] >= 0].groupby("partition")["category"]
    assert sorted(per_client.unique().map(tuple)) == [("brick",), ("washer",)]


def test_unknown_category_names_the_setting_and_lists_the_available(root):
    with pytest.raises(ConfigError, match=r"category='bolt'.*available: brick, washer"):
        prepare_data(ExperimentConfig(data_path=str(root), category="bolt"), 2)


def test_dataset_categories_defaults_to_all_and_names_what_is_missing(root, tmp_path):
    assert dataset_categories(str(root)) == (root.resolve(), ("brick", "washer"))
    assert dataset_categories(str(root), ["washer"])[1] == ("washer",)
    with pytest.raises(ConfigError, match=r"bolt not found.*available: brick, washer"):
        dataset_categories(str(root), ["washer", "bolt"])
    with pytest.raises(ConfigError, match="no category folders"):
        dataset_categories(str(tmp_path))
    with pytest.raises(ConfigError, match="data-path='/no/such/dir'"):
        dataset_categories("/no/such/dir")
