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
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from kdsearch.config import LatencyConfig, ModelConfig, Runtime, to_dict
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.infra.cpu_share import machine_share
from kdsearch.infra.device import device_name
from kdsearch.infra.tensor_cache import content_key
from kdsearch.runtime.latency import latency_ms
from kdsearch.runtime.onnx_runtime import OUTPUT, export_onnx, latency_feed, onnx_latency_ms, quantize_int8, session

BUSY_CORES = 0.3  # other processes' cores above which a timing is not cached (contention inflates it)
CALIBRATION_IMAGES = 256  # training images that calibrate an int8 model


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


class Exported:
    """A model's ONNX files in ``folder``, each written when first asked for: exporting takes seconds, so
    every timing and evaluation of one model shares one fp32 export and one int8 quantisation."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, folder: str | Path):
        self.model, self.calibration, self.folder = model, calibration, Path(folder)
        self._paths: dict[Runtime, Path] = {}

    def path(self, runtime: str) -> Path:
        runtime = Runtime(runtime)
        if runtime not in self._paths:
            if runtime == Runtime.ONNX_FP32:
                self._paths[runtime] = export_onnx(self.model, self.folder / "model.onnx", self.image_size)
            elif runtime == Runtime.ONNX_INT8:
                fp32 = self.path(Runtime.ONNX_FP32)
                self._paths[runtime] = quantize_int8(fp32, self.folder / "model.int8.onnx", self.calibration)
            else:
                raise ValueError(f"{runtime} has no ONNX file")
        return self._paths[runtime]

    @property
    def image_size(self) -> int:
        """The side of the images the model takes: the training images' (the calibration set)."""
        return self.calibration.shape[-1]


def _measure(exported: Exported, runtime: Runtime, batch: int, threads: int, latency: LatencyConfig) -> float:
    if runtime == Runtime.TORCH:
        with _torch_threads(threads):
            return latency_ms(exported.model, batch, torch.device("cpu"), latency, exported.image_size)
    return onnx_latency_ms(session(exported.path(runtime), threads), batch, latency.warmup, latency.repeats)


def runtime_latency(
    model: nn.Module,
    architecture: ModelConfig,
    runtime: str,
    batch: int,
    threads: int,
    latency: LatencyConfig,
    calibration: torch.Tensor,
    cache_dir: str | Path,
    exported: Exported | None = None,
) -> Timing:
    """Median ms of one forward of ``batch`` images of ``model`` (built as ``architecture``) in ``runtime``.

    ``calibration``: uint8 training images for the int8 quantisation (its latency does not depend on
    them, its accuracy does). ``exported``: the model's ONNX files when the caller has them already.
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
    if calibration.shape[-1] != 32:  # keyed only off CIFAR's size, so the 32-pixel timings cached before stay valid
        fields["image_size"] = calibration.shape[-1]
    path = Path(cache_dir) / "latency" / f"{content_key(fields)}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return Timing(stored["latency_ms"], stored["other_cores"], cached=True)
    with contextlib.ExitStack() as stack:
        if exported is None:
            exported = Exported(model, calibration, stack.enter_context(tempfile.TemporaryDirectory()))
        if runtime != Runtime.TORCH:
            exported.path(runtime)  # the export is not part of the timing
        with machine_share().timing(), OtherProcesses() as others:
            value = _measure(exported, runtime, batch, threads, latency)
    if others.cores is not None and others.cores < BUSY_CORES:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({**fields, "latency_ms": value, "other_cores": others.cores}))
            tmp.replace(path)
    return Timing(value, others.cores, cached=False)


BURST = 5  # passes of one model in a row in each round of interleaved_latency; the last is timed


def interleaved_latency(
    models: list[Exported], runtime: str, batch: int, threads: int, latency: LatencyConfig, burst: int = BURST
) -> tuple[list[float], float | None]:
    """Median ms of one forward of ``batch`` images of each model in ``runtime``, timed together, not cached:
    after each model's ``warmup`` passes, ``repeats`` rounds, in each of which every model in turn runs
    ``burst`` passes in a row and the last one is timed.

    Why: a ratio of two timings taken minutes apart inherits the machine's drift in between (a shared
    virtual machine here ran the same teacher at 2.06 ms in one demo and 2.92 ms in the next, quiet both
    times); rounds interleaved within one measurement see the same machine. Why bursts: a model timed
    right after another one runs cold (its weights out of the caches): single interleaved passes ran
    MobileNetV3-small 2.4-2.8x and the paper's student 1.07-1.14x slower than in a loop of its own, where a
    deployed model runs; the last of 5 passes in a row ran at 0.8-1.2x of the loop, this VM's noise
    (bench/out/interleaved_bursts.txt, three runs).
    Returns the medians and the cores other processes used meanwhile (None where unmeasurable).
    """
    runtime = Runtime(runtime)
    with contextlib.ExitStack() as stack:
        if runtime == Runtime.TORCH:
            stack.enter_context(_torch_threads(threads))
            stack.enter_context(torch.inference_mode())
            runners = [_torch_runner(exported, batch) for exported in models]
        else:
            runners = [_onnx_runner(exported.path(runtime), batch, threads) for exported in models]
        with machine_share().timing(), OtherProcesses() as others:
            for run in runners:
                for _ in range(latency.warmup):
                    run()
            timings: list[list[float]] = [[] for _ in runners]
            for _ in range(latency.repeats):
                for run, times in zip(runners, timings, strict=True):
                    for _ in range(burst - 1):
                        run()
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(times) for times in timings], others.cores


def _torch_runner(exported: Exported, batch: int):
    model = copy.deepcopy(exported.model).eval().to(memory_format=torch.channels_last)
    size = exported.image_size
    images = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return lambda: model(images)


def _onnx_runner(path: Path, batch: int, threads: int):
    runner = session(path, threads)
    feed = latency_feed(runner, batch)
    return lambda: runner.run([OUTPUT], feed)


def onnx_latency_metrics(
    model: nn.Module,
    architecture: ModelConfig,
    latency: LatencyConfig,
    calibration: torch.Tensor,
    cache_dir: str | Path,
    prefix: str,
) -> dict[str, float]:
    """{"<prefix>_onnx_fp32_b1": ms, ...}: ``model`` in each of ``latency.onnx_runtimes`` at each batch size,
    on the CPU at torch's thread count (as the torch eager timings beside them), cached per architecture;
    "<prefix>_onnx_other_cores": the most cores other processes used during a timing made now."""
    metrics: dict[str, float] = {}
    busiest = None
    with tempfile.TemporaryDirectory() as scratch:
        exported = Exported(model, calibration, scratch)
        for runtime in latency.onnx_runtimes:
            for batch in latency.batch_sizes:
                timing = runtime_latency(
                    model, architecture, runtime, batch, torch.get_num_threads(), latency, calibration, cache_dir,
                    exported,
                )  # fmt: skip
                metrics[f"{prefix}_{metric_name(runtime, batch).removeprefix('latency_ms_')}"] = timing.latency_ms
                if not timing.cached and timing.other_cores is not None:
                    busiest = max(busiest or 0.0, timing.other_cores)
    if busiest is not None:
        metrics[f"{prefix}_onnx_other_cores"] = busiest
    return metrics


def _versions(runtime: Runtime) -> dict[str, str]:
    from importlib.metadata import version

    versions = {"torch": torch.__version__}
    if runtime != Runtime.TORCH:
        versions["onnxruntime"] = version("onnxruntime")
    return versions


def metric_name(runtime: str, batch: int) -> str:
    """The MLflow metric of a deployment latency: latency_ms_onnx_fp32_b1."""
    return f"latency_ms_{Runtime(runtime).value.replace('-', '_')}_b{batch}"
