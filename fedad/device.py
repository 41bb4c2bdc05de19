"""Where tensors are computed: the ``device`` and ``precision`` run-config keys, the moving of
batches to a model's device, and the torch CPU threads of a process (``num-threads``).

The device is resolved on each machine (the server and every site, each on its own hardware):
``auto`` is CUDA when present, else the CPU. Models live on the device; data is read, decoded
and drawn from seeded generators on the CPU and moved there batch by batch; what a method hands
on (predictions, payloads, state dicts) goes back to CPU tensors or numpy arrays. Float64
statistics (the heads' Gaussians, moments, EM sufficient statistics) stay float64 on the device;
MPS has no float64, so the heads compute on the CPU under ``device=mps``
(:func:`float64_device`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fedad.config import ExperimentConfig

T = TypeVar("T")

CPU = torch.device("cpu")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
"""``precision`` values -> the dtype torch.autocast computes in (None: float32, no autocast)."""
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _error(message: str) -> Exception:
    from fedad.config import ConfigError  # fedad.config imports this module

    return ConfigError(message)


def check_device_setting(setting: str) -> None:
    """ConfigError naming the ``device`` key unless ``setting`` is one of its forms (whether
    the device exists is :func:`resolve_device`'s question)."""
    if not _DEVICE.fullmatch(setting):
        raise _error(f"device={setting!r}: expected {DEVICE_FORMS}")


def check_precision_setting(precision: str) -> None:
    """ConfigError naming the ``precision`` key unless it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise _error(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")


def available_devices() -> list[str]:
    """The devices this machine has: ``cpu``, ``cuda:0`` ... and ``mps`` where present."""
    devices = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(setting: str) -> torch.device:
    """The torch device of a ``device`` setting (``auto``: ``cuda`` when present, else ``cpu``).

    ConfigError in one line naming the key and this machine's devices when the setting is
    malformed (``gpu``) or names a device that is not here (``cuda`` without CUDA, ``cuda:3``
    with one GPU, ``mps`` without MPS).
    """
    check_device_setting(setting)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    present = {
        "cpu": True,
        "mps": torch.backends.mps.is_available(),
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
    }[device.type]
    if not present:
        raise _error(f"device={setting!r}: no such device on this machine (available: "
                     f"{', '.join(available_devices())})")
    return device


def device_of(cfg: ExperimentConfig) -> torch.device:
    """The run's device on this machine (:func:`resolve_device` of ``cfg.device``), checked
    against ``cfg.precision``: ``16-mixed`` needs CUDA (ConfigError in one line otherwise)."""
    device = resolve_device(cfg.device)
    if cfg.precision == "16-mixed" and device.type != "cuda":
        raise _error(f"precision='16-mixed': float16 autocast needs a CUDA device (device="
                     f"{cfg.device!r} is {device.type} here); use precision='bf16-mixed' or '32'")
    return device


def float64_device(device: torch.device) -> torch.device:
    """``device``, or the CPU for MPS (which has no float64)."""
    return CPU if device.type == "mps" else device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast on ``device`` in the dtype of ``precision`` (:data:`PRECISIONS`); a
    no-op context for ``32``."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model with none)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return CPU if tensor is None else tensor.device


def to_device(value: T, device: torch.device) -> T:
    """``value`` with every tensor in it moved to ``device``: a tensor, or a dict / tuple / list
    of them (a loader's batch ``{"image": [B, 3, H, W], ...}``), nested; other values as they
    are. Tensors already there are returned as they are (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def cpu_numpy(tensor: torch.Tensor) -> Any:
    """``tensor`` (any device, any float dtype) as a numpy array on the CPU: float32 for a
    reduced-precision float (bfloat16 has no numpy dtype), its own dtype otherwise."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def thread_count(setting: int) -> int:
    """The torch CPU threads of a ``num-threads`` setting: the setting when > 0; for 0, the
    environment's ``OMP_NUM_THREADS`` (which Flower's Ray simulation sets in each ClientApp to
    its ``client-resources-num-cpus``, at least 1), else torch's own count (every core)."""
    if setting > 0:
        return setting
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return torch.get_num_threads()


def configure_threads(setting: int) -> int:
    """Set torch's CPU threads to :func:`thread_count` of ``setting``; returns the count."""
    count = thread_count(setting)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
