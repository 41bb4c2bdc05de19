"""ExperimentConfig: run-config parsing, validation messages, YAML round-trip; every key
declared once (pyproject.toml agrees with the dataclasses, docs/config.md is generated)."""

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli

import fedad.config
from fedad.cli import main
from fedad.config import CORE, SECTIONS, ConfigError, ExperimentConfig, declared_fields
from fedad.heads.registry import head_settings_from

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GateSettings:
    """A section registered by the ``test_section`` fixture only."""

    tau: float = 0.1
    num_steps: int = 3
    use_gate: bool = False


@pytest.fixture
def test_section(monkeypatch):
    """SECTIONS plus :class:`GateSettings` (keys tau, num-steps, use-gate)."""
    monkeypatch.setattr(fedad.config, "SECTIONS", (*SECTIONS, f"{__name__}:GateSettings"))


def _class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def test_from_run_config_converts_kebab_keys_and_types():
    cfg = ExperimentConfig.from_run_config(
        {"num-server-rounds": "5", "lr": 0.01, "use-real-defects": "false", "cfa_tau": 0.3}
    )
    assert cfg.num_server_rounds == 5
    assert cfg.lr == 0.01
    assert cfg.use_real_defects is False
    assert cfg.extra == {"cfa-tau": 0.3}


def test_unknown_keys_are_refused_with_the_closest_valid_key(tmp_path):
    message = (r"unknown run-config keys 'foo-bar', 'num-protoypes' \(did you mean "
               r"'num-prototypes'\?\): valid keys are in docs/config.md")
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_run_config({"num-protoypes": 40, "foo-bar": 3})
    with pytest.raises(ConfigError, match=r"'num-server-round' \(did you mean 'num-server-rounds"):
        ExperimentConfig(extra={"num-server-round": 3})
    (tmp_path / "c.yaml").write_text("lr: 0.01\nlearning-rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown run-config key 'learning-rate'"):
        ExperimentConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"partitioner": "random"}, "partitioner='random'"),
        ({"method": "nope"}, "method='nope'"),
        ({"image-size": 100}, "image-size=100"),
        ({"num-server-rounds": -1}, "num-server-rounds=-1"),
        ({"lr": "fast"}, "lr='fast'"),
        ({"data-path": "/no/such/dir"}, "data-path='/no/such/dir'"),
        ({"use-real-defects": "maybe"}, "use-real-defects='maybe'"),
    ],
)
def test_bad_settings_name_the_key(settings, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        ExperimentConfig.from_run_config(settings)


@pytest.mark.parametrize(("method", "rounds"), [("msvt", 4), ("memorybank", 1), ("padim", 1)])
def test_num_server_rounds_zero_is_the_methods_own(method, rounds):
    assert ExperimentConfig(method=method).num_server_rounds == rounds
    assert ExperimentConfig(method=method, num_server_rounds=3).num_server_rounds == 3


def test_yaml_round_trip(tmp_path):
    cfg = ExperimentConfig(strategy="fedprox", seed=7, category="a,b")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert ExperimentConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_results_dir_is_absolute_and_unique_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAD_RESULTS", str(tmp_path))
    path = ExperimentConfig().resolved_results_dir()
    assert path.is_absolute() and path.parent == tmp_path
    assert ExperimentConfig(results_dir="rel").resolved_results_dir().is_absolute()


def test_section_reads_a_registered_sections_settings_with_types_and_errors(test_section):
    cfg = ExperimentConfig.from_run_config({"tau": "0.5", "use-gate": "true"})
    assert cfg.section(GateSettings) == GateSettings(tau=0.5, num_steps=3, use_gate=True)
    with pytest.raises(ConfigError, match="num-steps"):
        ExperimentConfig.from_run_config({"num-steps": 2.5}).section(GateSettings)
    with pytest.raises(ConfigError, match="unknown run-config key 'other'"):
        ExperimentConfig.from_run_config({"tau": "0.5", "other": 1})


def test_section_of_an_unregistered_class_is_refused():
    with pytest.raises(ConfigError, match="GateSettings: not a settings section"):
        ExperimentConfig().section(GateSettings)


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


def _declared() -> dict[str, object]:
    """Every declared run-config key -> its default (one declaration per key)."""
    keys: dict[str, object] = {}
    for spec in (CORE, *SECTIONS):
        for field in declared_fields(spec):
            assert field.key not in keys, f"{field.key}: declared twice (again in {spec})"
            keys[field.key] = field.default
    return keys


def test_declared_fields_are_the_dataclass_fields_with_their_defaults():
    for spec in (CORE, *SECTIONS):
        cls = _class(spec)
        bases = [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
        # a section may extend another section (HeadSettings extends MapSettings): the base
        # declares the inherited keys, once
        assert all(f"{b.__module__}:{b.__qualname__}" in SECTIONS for b in bases), spec
        inherited = {f.name for base in bases for f in dataclasses.fields(base)}
        real = {f.name: f.default for f in dataclasses.fields(cls)
                if f.name != "extra" and f.name not in inherited}
        assert {f.name: f.default for f in declared_fields(spec)} == real, spec


def test_pyproject_declares_every_key_with_the_same_default_and_type():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        pyproject = tomli.load(handle)["tool"]["flwr"]["app"]["config"]
    declared = _declared()
    assert sorted(set(pyproject) - set(declared)) == [], "pyproject keys without a field"
    assert sorted(set(declared) - set(pyproject)) == [], "fields without a pyproject key"
    differ = {key: (pyproject[key], default) for key, default in declared.items()
              if type(pyproject[key]) is not type(default) or pyproject[key] != default}
    assert differ == {}, "pyproject default vs field default"


def test_docs_config_md_is_generated_and_every_key_has_a_meaning(capsys):
    missing = [f"{spec} {field.name}" for spec in (CORE, *SECTIONS)
               for field in declared_fields(spec) if not field.doc]
    assert missing == [], "fields without an attribute docstring"
    assert all("\n" not in field.doc for spec in (CORE, *SECTIONS)
               for field in declared_fields(spec)), "attribute docstrings are one line"
    assert main(["config", "reference"]) == 0
    assert (ROOT / "docs" / "config.md").read_text() == capsys.readouterr().out, (
        "docs/config.md is stale: run `fedad config reference > docs/config.md`")
