"""Latency timings that the other kdsearch processes on the machine leave alone.

Two study workers share the cores: a latency timed while the other one trains measures the contention
as much as the model (BENCHMARKS.md, "Latency beside a training worker"). So the CPU-heavy loops take a
shared lock one step at a time (a training step, an evaluation batch, an IG call), and a timing takes it
exclusively: it waits for the steps under way to end, and the other processes wait before their next
step until it is done. A timing lasts seconds and a study times each architecture once, so training
slows by that little. Processes other than kdsearch are not held back; ``latency.OtherProcesses`` still
measures what they take, and the reports flag it.

The lock files live in the machine's kdsearch cache (KDSEARCH_CACHE_DIR, else ~/.cache/kdsearch), which
the containers of docker/compose.yaml share too. A second file is a turnstile: flock gives a waiting
exclusive lock no priority, so two workers whose shared steps overlap could keep a timing waiting for
ever; a waiting timing holds the turnstile, and a step passes through it before taking its shared lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kdsearch.config import default_cache_dir


class CpuShare:
    """The shared (``step``) and exclusive (``timing``) locks of the kdsearch processes using ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._descriptors: dict[str, int] = {}
        self._timings = 0  # nesting depth of this process's timing()

    def _descriptor(self, name: str) -> int:
        if name not in self._descriptors:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._descriptors[name] = os.open(self.directory / f"cpu-share.{name}", os.O_RDWR | os.O_CREAT, 0o666)
        return self._descriptors[name]

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One unit of CPU-heavy work; waits while another process times latency."""
        if self._timings:  # work this process does inside its own timing is what it times
            yield
            return
        turnstile, steps = self._descriptor("turnstile"), self._descriptor("steps")
        fcntl.flock(turnstile, fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(steps, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(steps, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """A latency measurement: no other process's step runs during it."""
        with contextlib.ExitStack() as held:
            if not self._timings:
                turnstile, steps = self._descriptor("turnstile"), self._descriptor("steps")
                fcntl.flock(turnstile, fcntl.LOCK_EX)
                held.callback(fcntl.flock, turnstile, fcntl.LOCK_UN)
                fcntl.flock(steps, fcntl.LOCK_EX)
                held.callback(fcntl.flock, steps, fcntl.LOCK_UN)
            self._timings += 1
            try:
                yield
            finally:
                self._timings -= 1


_SHARES: dict[Path, CpuShare] = {}


def machine_share() -> CpuShare:
    """The share of the kdsearch processes on this machine (those using the same cache directory)."""
    directory = default_cache_dir()
    if directory not in _SHARES:
        _SHARES[directory] = CpuShare(directory)
    return _SHARES[directory]
