"""Inference latency of a model: warm-up, then the median of timed repeats, with the thread count.

Measured in fp32, eval mode, without gradients, on channels_last input (the layout training uses),
on random 32x32 images: the latency of the architecture, not of particular weights. The median
resists the odd slow repeat that another process on a shared CPU causes, but not a neighbour that
keeps the cores busy throughout: so other kdsearch processes (a second study worker) pause their steps
during a timing (``cpu_share``), the CPU that other processes used during the timing is measured too,
and reports flag latencies taken on a busy machine.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from kdsearch.config import LatencyConfig
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.infra.cpu_share import machine_share


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms(
    model: nn.Module, batch_size: int, device: torch.device, config: LatencyConfig, image_size: int = 32
) -> float:
    """Median milliseconds of one forward pass of ``batch_size`` images of ``image_size`` pixels a side."""
    model = copy.deepcopy(model).to(device).eval().to(memory_format=torch.channels_last)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    for _ in range(config.warmup):
        model(images)
    _synchronize(device)
    timings = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        model(images)
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(timings)


def measure_latency(
    model: nn.Module, device: torch.device, config: LatencyConfig, prefix: str, image_size: int = 32
) -> dict[str, float]:
    """{"<prefix>_b1": ms, "<prefix>_b128": ms, ..., "latency_threads": n} for the configured batch sizes,
    and "<prefix>_other_cores": the cores other processes kept busy meanwhile (where measurable)."""
    with machine_share().timing(), OtherProcesses() as others:
        metrics = {
            f"{prefix}_b{size}": latency_ms(model, size, device, config, image_size) for size in config.batch_sizes
        }
    metrics["latency_threads"] = float(torch.get_num_threads())
    if others.cores is not None:
        metrics[f"{prefix}_other_cores"] = others.cores
    return metrics
