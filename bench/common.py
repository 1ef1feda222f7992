"""Shared helpers of the throughput benchmarks: the machine, the background load, the data, the models.

Not a benchmark itself; ``bench/ig_throughput.py`` and ``bench/train_throughput.py`` import it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from kdsearch.infra.cpu_load import OtherProcesses, machine_busy_seconds, own_cpu_seconds

DATA_DIR = "/work/shared/data/cifar10-jpeg"
DATA_LABEL = "CIFAR-10 (JPEG q75 copy)"
TEACHER = "/work/shared/models/mobilenetv2_cifar10jpeg_teacher.pt"
CACHE_DIR = "/tmp/kdbench-cache"
QUIET_CORES = 0.3  # other processes using less than this many cores: a timing is clean enough


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def library_version() -> str:
    """The git commit of the checkout, with "+dirty" when kdsearch/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "kdsearch"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine() -> dict:
    """What the numbers were measured on; printed in the header and stored in the JSON line."""
    return {
        "kdsearch_commit": library_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "python": platform.python_version(),
    }


def load1() -> float:
    """The 1-minute load average: above ~2 on this 2-core box means someone else was computing too."""
    return os.getloadavg()[0]


def busy_processes() -> list[str]:
    """Other processes using CPU right now (pid, %cpu, command), so a noisy timing can be explained."""
    try:
        output = subprocess.run(
            ["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    busy = []
    for line in output.splitlines():
        pid, pcpu, args = line.split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) >= 20.0:
            busy.append(f"{pid} {pcpu}% {args[:80]}")
    return busy


def header(title: str, info: dict) -> None:
    print(f"== {title}")
    print(f"machine: {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"date: {info['date']}; kdsearch at commit {info['kdsearch_commit']}")
    print(f"load average (1 min) at start: {load1():.2f}")
    for line in busy_processes():
        print(f"  busy at start: {line}")


def other_cores(window_s: float = 1.0) -> float:
    """Cores' worth of CPU used by other processes over the next ``window_s`` seconds (this one idle)."""
    with OtherProcesses() as others:
        time.sleep(window_s)
    return others.cores


def wait_quiet(max_wait_s: float, threshold: float = QUIET_CORES) -> float:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores; returns the last reading.

    Two busy threads of someone else on a 2-core machine make a 2-thread PyTorch run several times
    slower (OpenMP threads wait on each other), so a timing taken then says nothing about the code.
    """
    deadline = time.perf_counter() + max_wait_s
    reading = other_cores()
    waited = False
    while reading >= threshold and time.perf_counter() < deadline:
        if not waited:
            print(f"  waiting for a quiet machine (others use {reading:.2f} cores)...", flush=True)
            waited = True
        reading = other_cores(2.0)
    if waited:
        state = "quiet" if reading < threshold else "still busy, measuring anyway"
        print(f"  ... {state} (others use {reading:.2f} cores)", flush=True)
    return reading


def cpu_reading() -> tuple[float, float, float]:
    """(machine busy CPU-s, this process's CPU-s, wall s) now; two readings give ``others_between``."""
    return machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()


def others_between(first: tuple[float, float, float], second: tuple[float, float, float]) -> float:
    """Cores' worth of CPU used by other processes between two ``cpu_reading`` calls."""
    other = (second[0] - first[0]) - (second[1] - first[1])
    return max(0.0, other) / max(second[2] - first[2], 1e-9)


class Timer(OtherProcesses):
    """Wall time of a block (``seconds``), and how many cores other processes used meanwhile (``others``)."""

    def __enter__(self) -> Timer:
        self.load_before = load1()
        self.start = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        super().__exit__(*exc)
        self.others = self.cores
        self.load_after = load1()


def data_config(train_subset: int | None, val_size: int = 5000, data_dir: str = DATA_DIR):
    from kdsearch.config import DataConfig

    return DataConfig(
        dataset="folder", data_dir=data_dir, label=DATA_LABEL, val_size=val_size, train_subset=train_subset
    )


def cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE_DIR", CACHE_DIR))
