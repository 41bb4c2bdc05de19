"""ExperimentConfig: run-config parsing, validation messages, YAML round-trip."""

import pytest

from fedad.config import ConfigError, ExperimentConfig
from fedad.heads.registry import head_settings_from


def test_from_run_config_converts_kebab_keys_and_types():
    cfg = ExperimentConfig.from_run_config(
        {"num-server-rounds": "5", "lr": 0.01, "use-real-defects": "false", "foo-bar": 3}
    )
    assert cfg.num_server_rounds == 5
    assert cfg.lr == 0.01
    assert cfg.use_real_defects is False
    assert cfg.extra == {"foo-bar": 3}


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"partitioner": "random"}, "partitioner='random'"),
        ({"method": "nope"}, "method='nope'"),
        ({"image-size": 100}, "image-size=100"),
        ({"num-server-rounds": 0}, "num-server-rounds=0"),
        ({"lr": "fast"}, "lr='fast'"),
        ({"data-path": "/no/such/dir"}, "data-path='/no/such/dir'"),
        ({"use-real-defects": "maybe"}, "use-real-defects='maybe'"),
    ],
)
def test_bad_settings_name_the_key(settings, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        ExperimentConfig.from_run_config(settings)


def test_yaml_round_trip(tmp_path):
    cfg = ExperimentConfig(strategy="fedprox", seed=7, category="a,b")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert ExperimentConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_results_dir_is_absolute_and_unique_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAD_RESULTS", str(tmp_path))
    path = ExperimentConfig().resolved_results_dir()
    assert path.is_absolute() and path.parent == tmp_path
    assert ExperimentConfig(results_dir="rel").resolved_results_dir().is_absolute()


def test_section_reads_a_methods_own_settings_with_types_and_errors():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Settings:
        tau: float = 0.1
        num_steps: int = 3
        use_gate: bool = False

    cfg = ExperimentConfig.from_run_config({"tau": "0.5", "use-gate": "true", "other": 1})
    assert cfg.section(Settings) == Settings(tau=0.5, num_steps=3, use_gate=True)
    with pytest.raises(ConfigError, match="num-steps"):
        ExperimentConfig.from_run_config({"num-steps": 2.5}).section(Settings)


def test_head_settings_from_key_value_items_converts_and_names_bad_items():
    settings = head_settings_from(["num-prototypes=40", "map-baseline=false",
                                   "feature-layers=2,3"])
    assert settings.num_prototypes == 40
    assert settings.map_baseline is False
    assert settings.layers() == (2, 3)
    for items, needle in ((["num-protoypes=4"], "num-protoypes=4"),
                          (["max-patches"], "max-patches: expected KEY=VALUE"),
                          (["max-patches=x"], "max-patches='x'"),
                          (["image-score=mean"], "image-score='mean'")):
        with pytest.raises(ConfigError, match=needle):
            head_settings_from(items)
