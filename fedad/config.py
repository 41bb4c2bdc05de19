"""One typed experiment configuration, built from Flower run-config or YAML.

Every component receives an :class:`ExperimentConfig`; no other module reads run-config keys.
Run-config keys are kebab-case (``num-server-rounds``); fields are their snake_case twins.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedad.methods import method_names
from partitions import PARTITIONERS

Section = TypeVar("Section")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one federated experiment needs, resolved and validated."""

    method: str = "msvt"
    strategy: str = "fedavg"
    base_strategy: str = "fedavg"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    num_server_rounds: int = 4
    local_epochs: int = 50
    batch_size: int = 8
    lr: float = 2e-3
    image_size: int = 128
    category: str = ""
    data_path: str = ""
    results_dir: str = ""
    seed: int = 0
    resume_from: str = ""
    backbone: str = "lite0"
    backbone_checkpoint: str = ""
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    round_timeout: float = 3600.0
    val_fraction: float = 0.15
    use_real_defects: bool = True
    max_train_batches: int = 0
    proximal_mu: float = 0.01
    server_lr: float = 0.0
    server_momentum: float = 0.9
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    plot_every_round: bool = True
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
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
        positive = ("num_server_rounds", "local_epochs", "batch_size", "image_size")
        for name in positive:
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

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ExperimentConfig:
        """Build from Flower's run-config (kebab-case keys); unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = _coerce(cls, name, value)
            else:
                extra[key] = value
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
        return cls.from_run_config(data)

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

        ``cls`` is a frozen dataclass whose fields have defaults; the run-config key of field
        ``tau_cfa`` is ``tau-cfa``. Values are converted to the field types (ConfigError naming
        the key otherwise) and ``cls.__post_init__`` may validate them.
        """
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
