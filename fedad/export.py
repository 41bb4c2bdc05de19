"""``fedad export``: a run's scorer (:mod:`fedad.predict.scorers`: images [B, 3, S, S] in
[0, 1] -> (score [B], map [B, S, S]) in [0, 1]) as an ONNX, TorchScript or OpenVINO file,
with the preprocessing and the decision thresholds in its metadata, and the check that the
runtime's outputs match torch's on the run's test images.

Feature heads export whole: the backbone, the whitening and the head's prototypes / Gaussians
/ flow as constant tensors, the map baseline and the calibration. The graph is traced on one
image with its batch axis left free: the file scores any number of images per call (the check
runs batches of :data:`CHECK_BATCH` and a smaller last one). Metadata: ONNX
``metadata_props``, OpenVINO ``rt_info`` under ``fedad``, and for TorchScript a sidecar
``FILE.json`` (also inside the archive as ``extra/metadata.json``).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from fedad.data import Sample
from fedad.predict.inputs import read_image
from fedad.predict.run import Run, load_scorer, run_thresholds, test_split
from fedad.predict.scorers import Scorer

FORMATS = ("onnx", "torchscript", "openvino")
INPUT, OUTPUTS = "image", ("score", "map")
TOLERANCE = 1e-4
"""Largest |runtime - torch| difference of any score or map value the check accepts."""
CHECK_BATCH = 3
"""Images per runtime call in the check: not the traced one, so the check runs the free batch
axis."""
BATCH = "batch"
"""The name of the free batch axis of the input and of both outputs."""
OPSET = 17


class ExportError(ValueError):
    """An export that cannot be written or fails its check; one line naming the file."""


def metadata(run: Run, scorer: Scorer) -> dict[str, str]:
    """What a runtime needs besides the graph: the input's preprocessing, the outputs'
    meaning, the decision thresholds and where the model comes from."""
    size = scorer.image_size
    thresholds = run_thresholds(run)
    return {
        "fedad_version": version("fedad"), "method": run.cfg.method,
        "results_dir": str(run.root), "round": str(run.round),
        "input": f"{INPUT}: float32 [{BATCH}, 3, {size}, {size}], RGB, NCHW",
        "preprocessing": f"decode to RGB (grey and RGBA converted), resize to {size} x {size} "
                         "(PIL bilinear, antialiased), divide by 255",
        "image_size": str(size), "batch": "any (the first axis is free)", "value_range": "0,1",
        "normalisation": "none outside the graph (a backbone's mean/std is applied inside)",
        "outputs": f"{OUTPUTS[0]}: float32 [{BATCH}] in [0, 1]; {OUTPUTS[1]}: float32 "
                   f"[{BATCH}, {size}, {size}] in [0, 1]",
        "image_threshold": f"{thresholds.image:g}", "pixel_threshold": f"{thresholds.pixel:g}",
        "decision": "anomalous when score >= image_threshold; a pixel when map >= "
                    "pixel_threshold",
    }


def example_batch(scorer: Scorer) -> torch.Tensor:
    """A grey image [1, 3, S, S] to trace ``scorer`` on."""
    return torch.full((1, 3, scorer.image_size, scorer.image_size), 0.5)


def trace(scorer: Scorer, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The exported graph of ``scorer`` (:meth:`Scorer.exported`) traced on ``example``
    [B, 3, S, S]."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)
        return torch.jit.trace(scorer.exported(), example, check_trace=False)


def _write_onnx(traced: torch.jit.ScriptModule, example: torch.Tensor, out: Path,
                meta: dict[str, str]) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        warnings.filterwarnings("ignore", "no signature found", UserWarning)
        torch.onnx.export(traced, (example,), str(out), dynamo=False, input_names=[INPUT],
                          output_names=list(OUTPUTS), opset_version=OPSET,
                          dynamic_axes={name: {0: BATCH} for name in (INPUT, *OUTPUTS)})
    model = onnx.load(str(out))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))


def _write_openvino(traced: torch.jit.ScriptModule, example: torch.Tensor, out: Path,
                    meta: dict[str, str]) -> None:
    """OpenVINO IR (``out`` .xml and its .bin, float32 weights) converted from the ONNX
    graph."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(folder) / "model.onnx"
        _write_onnx(traced, example, onnx_file, meta)
        model = ov.convert_model(str(onnx_file))
    for key, value in meta.items():
        model.set_rt_info(value, ["fedad", key])
    ov.save_model(model, str(out), compress_to_fp16=False)  # keep float32 weights


def export_scorer(scorer: Scorer, fmt: str, out: str | Path, meta: dict[str, str]) -> Path:
    """Write ``scorer`` as ``fmt`` (one of :data:`FORMATS`) to ``out``, its batch axis free,
    with ``meta`` (:func:`metadata`); returns the file. ExportError naming the format."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out).expanduser().resolve()
    if fmt == "openvino" and out.suffix != ".xml":
        raise ExportError(f"--out={str(out)!r}: an OpenVINO model is an .xml file (with its "
                          ".bin beside it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = example_batch(scorer)
    traced = trace(scorer, example)
    if fmt == "onnx":
        _write_onnx(traced, example, out, meta)
    elif fmt == "openvino":
        try:
            _write_openvino(traced, example, out, meta)
        except ImportError:
            raise ExportError("--format=openvino: OpenVINO is not installed (pip install "
                              "'fedad[export]')") from None
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.save", FutureWarning)
            torch.jit.save(traced, str(out), _extra_files={"metadata.json": json.dumps(meta)})
        out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=2))
    return out


def runtime(path: str | Path, fmt: str) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """images [B, 3, S, S] float32 -> (scores [B], maps [B, S, S]) by the runtime of ``fmt``:
    onnxruntime (CPU), TorchScript, or OpenVINO (CPU, float32 inference)."""
    path = str(path)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images: tuple(session.run(list(OUTPUTS), {INPUT: images}))
    if fmt == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda images: tuple(compiled(images)[i] for i in range(len(OUTPUTS)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load", FutureWarning)
        module = torch.jit.load(path)
    return lambda images: tuple(t.numpy() for t in module(torch.from_numpy(images)))


@torch.no_grad()
def check_export(path: str | Path, fmt: str, scorer: Scorer, samples: Sequence[Sample]
                 ) -> float:
    """The largest |runtime - torch| difference over the scores and maps of ``samples`` (in
    batches of :data:`CHECK_BATCH`), between the exported file and ``scorer.exported()``;
    ExportError naming the file when above :data:`TOLERANCE`."""
    if not samples:
        raise ExportError(f"{path}: no images to check the export on")
    run_file, reference = runtime(path, fmt), scorer.exported()
    images = np.stack([read_image(s.image_path, scorer.image_size)[0] for s in samples])
    images = images.transpose(0, 3, 1, 2)
    worst = 0.0
    for start in range(0, len(images), CHECK_BATCH):
        batch = images[start:start + CHECK_BATCH]
        expected = reference(torch.from_numpy(np.ascontiguousarray(batch)))
        for got, want in zip(run_file(np.ascontiguousarray(batch)), expected, strict=True):
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
    if not worst <= TOLERANCE:
        raise ExportError(f"{path}: {fmt} outputs differ from torch's by {worst:.3g} on "
                          f"{len(samples)} test images (tolerance {TOLERANCE:g})")
    return worst


def export_and_check(run: Run, fmt: str, out: str | Path, limit: int | None = None
                     ) -> tuple[Path, float, int]:
    """Export ``run``'s scorer (:func:`export_scorer`), then :func:`check_export` it on the
    first ``limit`` (all when None) of the run's test images; (file, largest difference,
    images checked). The scorer is built on the CPU: the exported graph runs on the line's
    CPU runtimes, whatever device the run trained on."""
    scorer = load_scorer(run, device="cpu")
    path = export_scorer(scorer, fmt, out, metadata(run, scorer))
    samples = test_split(run)[:limit]
    return path, check_export(path, fmt, scorer, samples), len(samples)
