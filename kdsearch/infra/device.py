"""Where a run computes and in which precision: CUDA when present, bf16 where the hardware runs it natively."""

from __future__ import annotations

import platform
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from kdsearch.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available")
    return device


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # bf16 autocast is measured faster than fp32 only on CPUs with native bf16 (AVX512-BF16/AMX).
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device, fp16_fallback: bool = True) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto: bf16 where the hardware runs it natively, else fp16
    on a GPU (with ``fp16_fallback``), else fp32."""
    if name == "fp32":
        return None
    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if fp16_fallback and device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"cpu:{cpu} ({threads} thread{'' if threads == 1 else 's'})"
