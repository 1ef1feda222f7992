"""What a model costs to keep and to run, the teacher's and every student's alike: parameters, FLOPs,
bytes on disk, and latency in PyTorch and in each ONNX runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from kdsearch.config import LatencyConfig, ModelConfig
from kdsearch.models.classifiers import count_flops, count_parameters, size_on_disk_bytes
from kdsearch.runtime.latency import measure_latency
from kdsearch.runtime.timing import onnx_latency_metrics


def model_costs(
    model: torch.nn.Module,
    architecture: ModelConfig,
    role: str,
    calibration: torch.Tensor,
    device: torch.device,
    latency: LatencyConfig,
    cache_dir: str | Path,
) -> dict[str, float]:
    """``{role}_params``, ``{role}_flops``, ``{role}_size_bytes`` and the ``latency_ms_{role}…`` metrics of
    ``model`` (built as ``architecture``), at the size of the ``calibration`` images (training images,
    which also calibrate its int8 ONNX model)."""
    image_size = calibration.shape[-1]
    return {
        f"{role}_params": float(count_parameters(model)),
        f"{role}_flops": float(count_flops(model, image_size)),
        f"{role}_size_bytes": float(size_on_disk_bytes(model)),
        **measure_latency(model, device, latency, f"latency_ms_{role}", image_size),
        **onnx_latency_metrics(model, architecture, latency, calibration, cache_dir, f"latency_ms_{role}"),
    }
