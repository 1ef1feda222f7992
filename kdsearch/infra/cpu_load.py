"""How busy the machine is: CPU-seconds of the whole machine and of this process, and the cores other
processes used while a block ran (latency timings flag a busy machine; threads are sized by it)."""

from __future__ import annotations

import os
import resource
import time


def machine_busy_seconds() -> float | None:
    """CPU-seconds the whole machine (all cores) has spent busy since boot; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process (all threads) and of its reaped children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherProcesses:
    """Cores' worth of CPU that other processes used while the block ran (``cores``; None if unknown)."""

    cores: float | None = None

    def __enter__(self) -> OtherProcesses:
        self._busy, self._own, self._start = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = machine_busy_seconds()
        if busy is None or self._busy is None:
            return
        other = (busy - self._busy) - (own_cpu_seconds() - self._own)
        self.cores = max(0.0, other) / max(time.perf_counter() - self._start, 1e-9)
