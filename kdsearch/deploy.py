"""Latency where a student deploys: PyTorch eager, or ONNX Runtime's CPU provider in fp32 or int8,
at a fixed batch size and thread count, cached by what it depends on.

Latency depends on the architecture, the runtime, the precision, the threads, the batch size and the
CPU, not on the trained weights, so a search measures each architecture once per runtime: the cache key
is (architecture incl. a pruned student's channels, runtime, batch, threads, warm-up, repeats, CPU
model, torch and onnxruntime versions). Method: ``warmup`` untimed passes, then the median of
``repeats`` timed passes on one fixed batch (``latency.latency_ms``, ``onnx_runtime.onnx_latency_ms``);
the cores other processes used meanwhile are recorded beside the value, and a value timed on a busy
machine is not cached, so the next request measures again.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from kdsearch.config import ModelConfig, Runtime, to_dict
from kdsearch.latency import LatencyConfig, OtherProcesses, latency_ms
from kdsearch.onnx_runtime import export_onnx, onnx_latency_ms, quantize_int8, session
from kdsearch.tensor_cache import content_key
from kdsearch.tracking import device_name

BUSY_CORES = 0.3  # other processes' cores above which a timing is not cached (contention inflates it)


@dataclass(frozen=True)
class Timing:
    latency_ms: float
    other_cores: float | None  # cores other processes used during the timing; None where unmeasurable
    cached: bool  # read from the cache rather than measured now


@contextlib.contextmanager
def _torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(
    model: nn.Module, runtime: Runtime, batch: int, threads: int, latency: LatencyConfig, calibration: torch.Tensor
) -> float:
    if runtime == Runtime.TORCH:
        with _torch_threads(threads):
            return latency_ms(model, batch, torch.device("cpu"), latency)
    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(model, Path(scratch) / "model.onnx")
        if runtime == Runtime.ONNX_INT8:
            path = quantize_int8(path, Path(scratch) / "model.int8.onnx", calibration)
        return onnx_latency_ms(session(path, threads), batch, latency.warmup, latency.repeats)


def runtime_latency(
    model: nn.Module,
    architecture: ModelConfig,
    runtime: str,
    batch: int,
    threads: int,
    latency: LatencyConfig,
    calibration: torch.Tensor,
    cache_dir: str | Path,
) -> Timing:
    """Median ms of one forward of ``batch`` images of ``model`` (built as ``architecture``) in ``runtime``.

    ``calibration``: uint8 training images for the int8 quantisation (its latency does not depend on
    them, its accuracy does).
    """
    runtime = Runtime(runtime)
    fields = {
        "architecture": to_dict(architecture),
        "runtime": runtime.value,
        "batch": batch,
        "threads": threads,
        "warmup": latency.warmup,
        "repeats": latency.repeats,
        "cpu": device_name(torch.device("cpu")).split(" (")[0],
        "versions": _versions(runtime),
    }
    path = Path(cache_dir) / "latency" / f"{content_key(fields)}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return Timing(stored["latency_ms"], stored["other_cores"], cached=True)
    with OtherProcesses() as others:
        value = _measure(model, runtime, batch, threads, latency, calibration)
    if others.cores is not None and others.cores < BUSY_CORES:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({**fields, "latency_ms": value, "other_cores": others.cores}))
            tmp.replace(path)
    return Timing(value, others.cores, cached=False)


def _versions(runtime: Runtime) -> dict[str, str]:
    from importlib.metadata import version

    versions = {"torch": torch.__version__}
    if runtime != Runtime.TORCH:
        versions["onnxruntime"] = version("onnxruntime")
    return versions


def metric_name(runtime: str, batch: int) -> str:
    """The MLflow metric of a deployment latency: latency_ms_onnx_fp32_b1."""
    return f"latency_ms_{Runtime(runtime).value.replace('-', '_')}_b{batch}"
