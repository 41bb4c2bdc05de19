"""One typed experiment configuration, built from Flower run-config or YAML.

Every component receives an :class:`ExperimentConfig`; no other module reads run-config keys.
Run-config keys are kebab-case (``num-server-rounds``); fields are their snake_case twins. Each
key is declared once: a field of :class:`ExperimentConfig` (core keys) or of one settings
dataclass listed in :data:`SECTIONS`, with a one-line attribute docstring giving its meaning
(docs/config.md is generated from them). Any other key is refused.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedad.device import check_device_setting, check_precision_setting
from fedad.methods import method_entry, method_names
from partitions import PARTITIONERS

Section = TypeVar("Section")

CORE = "fedad.config:ExperimentConfig"
SECTIONS: tuple[str, ...] = (
    "strategies.aca:ACASettings",
    "strategies.cfa:CFASettings",
    "fedad.mae.settings:MAESettings",
    "fedad.nexvitad.settings:NexViTADSettings",
    "fedad.heads.settings:HeadSettings",
    "fedad.dadda.settings:DADDASettings",
    "fedad.dam.settings:DAMSettings",
    "fedad.privacy:DPSettings",
    "fedad.attacks:AttackSettings",
    "fedad.models.anomaly_map:MapSettings",
    "fedad.thresholds:ThresholdSettings",
)
"""Every settings section ("module:Class"), read by :meth:`ExperimentConfig.section`. Their keys
are found by parsing the modules' source, so a run imports only the sections it uses."""

REFERENCE = "docs/config.md"


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one federated experiment needs, resolved and validated."""

    method: str = "msvt"
    """Detector: msvt, mae, memorybank, gmm, flow, padim, dadda or nexvitad (README, Detectors)."""
    strategy: str = "fedavg"
    """fedavg fedprox fedadam fedyogi fedavgm fedmedian fedtrimmedavg krum, or aca cfa fedmsvt."""
    base_strategy: str = "fedavg"
    """What aca / cfa / fedmsvt wrap: fedavg, fedprox, fedavgm, fedadam or fedyogi."""
    partitioner: str = "iid"
    """Partitioner: iid, label-wise (one client per defect type), dirichlet or by-category."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partitioner."""
    num_server_rounds: int = 0
    """Federated rounds; 0: the method's own (msvt, mae, dadda 4; nexvitad 3; the heads 1)."""
    local_epochs: int = 50
    """Local training epochs of a site per round."""
    batch_size: int = 8
    """Training batch size."""
    lr: float = 2e-3
    """Learning rate of local training."""
    image_size: int = 128
    """Side images are resized to (a multiple of 32)."""
    category: str = ""
    """One category, a comma list or all; empty: the dataset's default category."""
    data_path: str = ""
    """A folder in the MVTec AD layout; empty: the built-in synthetic data."""
    results_dir: str = ""
    """Absolute results folder; empty: a new folder under $FEDAD_RESULTS or ~/fedad-results."""
    seed: int = 0
    """Seeds the data split, partitions, synthesis and training."""
    resume_from: str = ""
    """A results folder to continue from its last checkpoint (same config)."""
    backbone: str = "lite0"
    """lite0 (frozen ImageNet EfficientNet-Lite0 stem), none (trainable stem) or a timm name."""
    backbone_checkpoint: str = ""
    """A local state-dict file for that timm backbone (never downloaded)."""
    fraction_train: float = 1.0
    """Fraction of the available sites asked to train each round, in (0, 1]."""
    min_train_nodes: int = 2
    """Rounds wait for this many sites; a round with fewer usable replies is skipped."""
    round_timeout: float = 3600.0
    """Seconds a round waits for replies."""
    val_fraction: float = 0.15
    """Share of each site's partition held out for local validation, in [0, 0.5)."""
    use_real_defects: bool = True
    """Train on the protocol's third of real defects."""
    max_train_batches: int = 0
    """Cap on training batches per local epoch (0: no cap)."""
    proximal_mu: float = 0.01
    """FedProx's proximal term weight mu."""
    server_lr: float = 0.0
    """Server learning rate of FedAdam / FedYogi / FedAvgM (0: the strategy's default)."""
    server_momentum: float = 0.9
    """Server momentum of FedAvgM."""
    trim_beta: float = 0.2
    """Fraction trimmed at each end by FedTrimmedAvg."""
    num_malicious_nodes: int = 0
    """Malicious sites Krum tolerates."""
    plot_every_round: bool = True
    """Write plots after every round (false: after the last one only)."""
    device: str = "auto"
    """Where models compute, on each machine: auto (CUDA if present, else CPU), cpu, cuda:N, mps."""
    precision: str = "32"
    """Autocast in training and inference: 32 (none), bf16-mixed, or 16-mixed (CUDA only)."""
    num_threads: int = 0
    """torch CPU threads of each site and the server; 0: OMP_NUM_THREADS if set, else all cores."""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.num_server_rounds == 0 and self.method in method_names():
            object.__setattr__(self, "num_server_rounds", method_entry(self.method).rounds)
        self._check()

    def _check(self) -> None:
        if self.method not in method_names():
            raise ConfigError(
                f"method={self.method!r}: expected one of {', '.join(method_names())}"
            )
        if self.partitioner not in PARTITIONERS:
            raise ConfigError(
                f"partitioner={self.partitioner!r}: expected one of {', '.join(PARTITIONERS)}"
            )
        if self.num_server_rounds < 1:
            raise ConfigError(f"num-server-rounds={self.num_server_rounds}: must be >= 1, or 0 "
                              "for the method's own")
        for name in ("local_epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_kebab(name)}={getattr(self, name)}: must be >= 1")
        if self.image_size % 32:
            raise ConfigError(f"image-size={self.image_size}: must be a multiple of 32")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if not self.dirichlet_alpha > 0:
            raise ConfigError(f"dirichlet-alpha={self.dirichlet_alpha}: must be > 0")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"val-fraction={self.val_fraction}: must be in [0, 0.5)")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout={self.round_timeout}: must be > 0 seconds")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train={self.fraction_train}: must be in (0, 1]")
        if self.backbone_checkpoint and not Path(self.backbone_checkpoint).is_file():
            raise ConfigError(f"backbone-checkpoint={self.backbone_checkpoint!r}: no such file")
        if self.data_path and not Path(self.data_path).expanduser().is_dir():
            raise ConfigError(f"data-path={self.data_path!r}: no such directory")
        check_device_setting(self.device)
        check_precision_setting(self.precision)
        if self.num_threads < 0:
            raise ConfigError(f"num-threads={self.num_threads}: must be >= 0 (0: automatic)")
        unknown = sorted({_kebab(key) for key in self.extra} - section_keys())
        if unknown:
            raise ConfigError(unknown_keys_message(unknown))

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ExperimentConfig:
        """Build from Flower's run-config (kebab- or snake-case keys): core keys become fields,
        section keys go to ``extra``; any other key is a ConfigError naming it."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = _coerce(cls, name, value)
            else:
                extra[_kebab(name)] = value
        return cls(**values, extra=extra)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        """Load a YAML file written by :meth:`to_yaml` (or by hand, kebab- or snake-case keys)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        try:
            return cls.from_run_config(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, the same keys as run-config."""
        out = {_kebab(k): v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out

    def to_yaml(self, path: str | Path) -> None:
        """Write the resolved config."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))

    def section(self, cls: type[Section]) -> Section:
        """A method's own typed settings, read from this config's extra run-config keys.

        ``cls`` is a frozen dataclass of :data:`SECTIONS` whose fields have defaults; the
        run-config key of field ``tau_cfa`` is ``tau-cfa``. Values are converted to the field
        types (ConfigError naming the key otherwise) and ``cls.__post_init__`` may validate them.
        """
        spec = f"{cls.__module__}:{cls.__qualname__}"
        if spec not in SECTIONS:
            raise ConfigError(f"{spec}: not a settings section (list it in fedad.config.SECTIONS)")
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in self.extra.items():
            name = key.replace("-", "_")
            if name in names:
                values[name] = _coerce(cls, name, value)
        try:
            return cls(**values)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolved_results_dir(self) -> Path:
        """Absolute results folder: ``results-dir`` or ``$FEDAD_RESULTS`` or ``~/fedad-results``.

        A fresh sub-folder named after method, strategy and partitioner is used when
        ``results-dir`` is empty, so runs never overwrite each other.
        """
        if self.resume_from:
            return Path(self.resume_from).expanduser().resolve()
        if self.results_dir:
            return Path(self.results_dir).expanduser().resolve()
        base = Path(os.environ.get("FEDAD_RESULTS", Path.home() / "fedad-results"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return (base / f"{stamp}-{self.method}-{self.strategy}-{self.partitioner}").resolve()


@dataclass(frozen=True)
class Declared:
    """One run-config key as a settings dataclass declares it (read from source)."""

    name: str
    """The field name (snake_case)."""
    default: Any
    """The default value."""
    doc: str
    """The attribute docstring under the field (empty when missing)."""

    @property
    def key(self) -> str:
        """The run-config key (kebab-case)."""
        return _kebab(self.name)


@functools.cache
def class_node(spec: str) -> tuple[Path, ast.ClassDef]:
    """The source file and the ``ast`` class of ``spec`` ("module:Class"), not imported."""
    module, name = spec.split(":")
    source = _source_file(module)
    tree = ast.parse(source.read_text(), str(source))
    node = next((node for node in tree.body
                 if isinstance(node, ast.ClassDef) and node.name == name), None)
    if node is None:
        raise ConfigError(f"{source}: no class {name} (named in fedad.config.SECTIONS)")
    return source, node


@functools.cache
def declared_fields(spec: str) -> tuple[Declared, ...]:
    """The run-config fields of the dataclass ``spec`` ("module:Class"), read from its source:
    every annotated field with a literal default and the string literal under it. A field built
    by ``field(...)`` (``extra``) is not a key."""
    source, cls = class_node(spec)
    out = []
    for node, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign) or isinstance(node.value, ast.Call | None):
            continue
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            doc = inspect.cleandoc(str(after.value.value))
        try:
            default = ast.literal_eval(node.value)
        except ValueError as err:
            raise ConfigError(f"{source}:{node.lineno}: {spec} field default must be a literal"
                              ) from err
        out.append(Declared(ast.unparse(node.target), default, doc))
    return tuple(out)


def section_keys() -> frozenset[str]:
    """Every run-config key (kebab-case) declared by a section of :data:`SECTIONS`."""
    return _section_keys(SECTIONS)


@functools.cache
def _section_keys(sections: tuple[str, ...]) -> frozenset[str]:
    return frozenset(f.key for spec in sections for f in declared_fields(spec))


def unknown_keys_message(unknown: list[str]) -> str:
    """One line naming the ``unknown`` run-config keys, each with the closest valid key."""
    valid = [f.key for f in declared_fields(CORE)] + sorted(section_keys())
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown run-config key{plural} {', '.join(named)}: valid keys are in {REFERENCE}"


def _source_file(module: str) -> Path:
    """The source file of ``module``, found without importing it (nor its package)."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__)
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{module}: module not found (named in fedad.config.SECTIONS)")
    if not rest:
        return Path(spec.origin)
    path = Path(spec.origin).parent.joinpath(*rest)
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a run-config value to the field's type; raise ConfigError naming the key."""
    default = next(f.default for f in fields(cls) if f.name == name)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{_kebab(name)}={value!r}: expected {type(default).__name__}"
        ) from err
