"""The ``device``, ``precision`` and ``num-threads`` keys (fedad.device): parsing, a device this
machine lacks refused in one line naming the key, ``cpu`` and ``auto`` giving the same metrics
on a machine without a GPU, bf16 autocast on the CPU, torch's threads per site."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY_METHODS, TINY_RUN

from fedad.config import ConfigError, ExperimentConfig
from fedad.data import generate_dataset
from fedad.device import (
    autocast,
    configure_threads,
    device_of,
    float64_device,
    resolve_device,
    thread_count,
    to_device,
)
from fedad.inprocess import run_in_process
from fedad.train.loop import train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TINY_RUN
METHODS = {m: TINY_METHODS[m] for m in ("msvt", "memorybank")}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("mvtec"), categories=["washer"],
                            num_train=8, num_test_good=2, num_test_per_defect=1, image_size=32)


def final_metrics(dataset, results, method: str, **keys) -> dict[str, float]:
    """The last round's server metrics of a tiny 2-site in-process run (timings left out)."""
    cfg = ExperimentConfig.from_run_config({**TINY, **METHODS[method], **keys,
                                            "data-path": str(dataset), "category": "washer",
                                            "results-dir": str(results)})
    final = run_in_process(cfg, 2)["final"]
    return {k: v for k, v in final.items() if not k.endswith("seconds")}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@no_cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_cpu_and_auto_give_identical_metrics_without_a_gpu(dataset, tmp_path, method):
    cpu = final_metrics(dataset, tmp_path / "cpu", method, device="cpu")
    auto = final_metrics(dataset, tmp_path / "auto", method, device="auto")
    np.testing.assert_equal(auto, cpu)
    assert 0.0 <= cpu["image_auroc"] <= 1.0 and 0.0 <= cpu["pixel_auroc"] <= 1.0


def test_bf16_mixed_runs_on_the_cpu_with_finite_results(dataset, tmp_path):
    metrics = final_metrics(dataset, tmp_path / "bf16", "msvt", device="cpu",
                            precision="bf16-mixed")
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    full = final_metrics(dataset, tmp_path / "32", "msvt", device="cpu", precision="32")
    assert metrics["train_loss"] != full["train_loss"]  # the autocast reached the training


@pytest.mark.parametrize(("precision", "dtype"), [("32", torch.float32),
                                                  ("bf16-mixed", torch.bfloat16)])
def test_train_loop_runs_steps_under_the_precisions_autocast(precision, dtype):
    model = torch.nn.Linear(4, 1)
    seen = []

    def step(batch):
        output = model(to_device(batch, torch.device("cpu")))
        seen.append(output.dtype)
        return output, None, {"loss": output.float().pow(2).mean()}

    before = model.weight.detach().clone()
    result = train_loop(step, [[torch.ones(2, 4)] * 2], torch.optim.SGD(model.parameters(), 0.1),
                        list(model.parameters()), precision=precision)
    assert seen == [dtype, dtype] and math.isfinite(result["train_loss"])
    assert not torch.equal(model.weight, before)  # the optimizer stepped


def test_device_strings_are_parsed_and_malformed_ones_refused_naming_the_key():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError) as err:
            resolve_device(bad)
        assert one_line(err).startswith(f"device={bad!r}: expected auto, cpu, cuda")
        with pytest.raises(ConfigError, match=f"device={bad!r}"):
            ExperimentConfig(device=bad)


@no_cuda
def test_cuda_is_refused_in_one_line_naming_what_is_here():
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as err:
            resolve_device(setting)
        assert one_line(err).startswith(f"device={setting!r}: no such device on this machine")
        assert "available: cpu" in str(err.value)


def test_cuda_indices_are_checked_against_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:3")
    assert one_line(err) == ("device='cuda:3': no such device on this machine (available: "
                             "cpu, cuda:0)")
    with pytest.raises(ConfigError, match=r"device='mps': no such device .*cpu, cuda:0\)"):
        resolve_device("mps")


@no_cuda
def test_a_run_on_a_missing_device_fails_at_start_before_writing_anything(dataset, tmp_path):
    cfg = ExperimentConfig.from_run_config({**TINY, **METHODS["msvt"], "device": "cuda",
                                            "data-path": str(dataset), "category": "washer",
                                            "results-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError) as err:  # the config itself is valid: a GPU run's YAML loads
        run_in_process(cfg, 2)
    assert one_line(err).startswith("device='cuda': no such device")
    assert not (tmp_path / "run").exists()


@no_cuda
def test_float16_autocast_is_refused_on_the_cpu_and_unknown_precisions_at_build():
    with pytest.raises(ConfigError) as err:
        device_of(ExperimentConfig(precision="16-mixed"))
    assert one_line(err).startswith("precision='16-mixed': float16 autocast needs a CUDA device")
    assert device_of(ExperimentConfig(precision="bf16-mixed")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"precision='fp8': expected one of 32, 16-mixed, bf16"):
        ExperimentConfig(precision="fp8")
    with pytest.raises(ConfigError, match="num-threads=-1"):
        ExperimentConfig(num_threads=-1)


def test_helpers_move_nested_batches_and_keep_float64_off_mps():
    image, label = torch.zeros(2, 3), torch.ones(2, dtype=torch.long)
    batch = {"image": image, "pair": (label, [label]), "name": "x"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image"].is_meta and moved["pair"][0].is_meta and moved["pair"][1][0].is_meta
    assert moved["name"] == "x" and isinstance(moved["pair"], tuple)
    assert to_device(batch, torch.device("cpu"))["image"] is image  # no copy where it is
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with autocast(torch.device("cpu"), "32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_threads_follow_num_threads_then_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what Ray sets for client-resources-num-cpus=3
    assert thread_count(2) == 2 and thread_count(0) == 3
    try:
        assert configure_threads(0) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(0) == before


def gpu_check():
    """bench/gpu_check.py as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_has_help_and_its_budget_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check().main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert all(f"--{name}" in usage for name in ("dadda-iterations", "msvt-batches",
                                                 "tolerance", "device"))


@no_cuda
def test_gpu_check_says_in_one_line_that_there_is_no_cuda_device(capsys):
    assert gpu_check().main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
