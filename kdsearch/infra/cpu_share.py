"""The kdsearch processes of one machine share its cores: latency timings that the others leave alone,
and as many torch threads per process as its share of the free cores.

Timings. Two study workers share the cores: a latency timed while the other one trains measures the
contention as much as the model (BENCHMARKS.md, "Latency beside a training worker"). So the CPU-heavy
loops take a shared lock one step at a time (a training step, an evaluation batch, an IG call), and a
timing takes it exclusively: it waits for the steps under way to end, and the other processes wait
before their next step until it is done. A timing lasts seconds and a study times each architecture
once, so training slows by that little. Processes other than kdsearch are not held back;
``cpu_load.OtherProcesses`` still measures what they take, and the reports flag it. A second file is a
turnstile: flock gives a waiting exclusive lock no priority, so two workers whose shared steps overlap
could keep a timing waiting for ever; a waiting timing holds the turnstile, and a step passes through
it before taking its shared lock.

Threads. torch runs as many threads as there are cores; four processes doing so on two cores ran 8-12x
slower than their share would explain (OpenMP threads spin at their barriers while another process
holds the core). So each process that computes registers itself here (a file it holds locked while it
lives) and sizes its threads to ``cores // live kdsearch processes``, lowered further to the cores
that processes outside kdsearch left free during its last epoch; an explicit OMP_NUM_THREADS or
KDSEARCH_THREADS is obeyed as given.

Both live in the machine's runtime directory (KDSEARCH_RUNTIME_DIR, else $XDG_RUNTIME_DIR/kdsearch,
else kdsearch-<uid> in the temporary directory), not in the cache: processes with different cache
directories still share the machine's cores. The containers of docker/compose.yaml share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class CpuShare:
    """The shared (``step``) and exclusive (``timing``) locks of the kdsearch processes using ``directory``.

    A timing waits at most ``timing_wait_s`` for the others' steps: a step lasts a second or so, so a
    longer wait means a process stopped (Ctrl-Z, SIGSTOP) inside one, holding its lock; the timing then
    runs without the lock (a stopped process takes no CPU, and OtherProcesses still measures those that do).
    """

    def __init__(self, directory: str | Path, timing_wait_s: float = 120.0):
        self.directory = Path(directory)
        self.timing_wait_s = timing_wait_s
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
                deadline = time.monotonic() + self.timing_wait_s
                for name in ("turnstile", "steps"):
                    descriptor = self._descriptor(name)
                    if not _lock_by(descriptor, deadline):
                        log.warning(
                            "another kdsearch process has held the CPU share for over %.0f s (stopped?); "
                            "timing without it",
                            self.timing_wait_s,
                        )
                        break
                    held.callback(fcntl.flock, descriptor, fcntl.LOCK_UN)
            self._timings += 1
            try:
                yield
            finally:
                self._timings -= 1


def _lock_by(descriptor: int, deadline: float) -> bool:
    """Take ``descriptor``'s exclusive flock, polling until ``deadline`` (time.monotonic); False if not."""
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def runtime_dir() -> Path:
    """This machine's (and user's) directory for the kdsearch processes' locks."""
    explicit = os.environ.get("KDSEARCH_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "kdsearch"
    return Path(tempfile.gettempdir()) / f"kdsearch-{os.getuid()}"


_SHARES: dict[Path, CpuShare] = {}


def machine_share() -> CpuShare:
    """The share of the kdsearch processes on this machine."""
    directory = runtime_dir()
    if directory not in _SHARES:
        _SHARES[directory] = CpuShare(directory)
    return _SHARES[directory]


class Presence:
    """The kdsearch processes alive on this machine: each holds a lock on a file of its own in ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._own: int | None = None

    def join(self) -> None:
        """Count this process from now until it exits (the kernel drops its lock then)."""
        if self._own is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # A random name, not the pid: containers on one machine have pids of their own.
        path = self.directory / f"{uuid.uuid4().hex}.lock"
        self._own = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._own, fcntl.LOCK_EX)

    def count(self) -> int:
        """Live processes (this one included once it has joined); the files of exited ones are removed."""
        live = 0
        for path in self.directory.glob("*.lock") if self.directory.is_dir() else ():
            try:
                descriptor = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # removed by another process's count
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
            else:
                path.unlink(missing_ok=True)  # its process has exited
            finally:
                os.close(descriptor)
        return live


def fair_threads(cores: int, processes: int, others_busy: float | None) -> int:
    """Threads for one of ``processes`` kdsearch processes on ``cores`` cores, of which processes outside
    kdsearch kept ``others_busy`` cores busy (None: unknown); at least one."""
    fair = max(1, cores // max(1, processes))
    if others_busy is None:
        return fair
    return max(1, min(fair, math.floor(cores - others_busy + 0.5)))


def pinned_threads() -> int | None:
    """The thread count the user fixed (KDSEARCH_THREADS, else OMP_NUM_THREADS), or None."""
    for name in ("KDSEARCH_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_PRESENCE: dict[Path, Presence] = {}


def share_threads(others_busy: float | None = None) -> int:
    """Size torch's threads to this process's share of the machine's cores and return the count.

    ``others_busy``: cores that other processes kept busy lately (the last epoch's ``OtherProcesses``;
    kdsearch neighbours included, which lowers the count no further than their share already does).
    """
    import torch  # here: `kdsearch --help` imports no torch

    pinned = pinned_threads()
    if pinned is not None:
        threads = pinned
    else:
        directory = runtime_dir() / "processes"
        presence = _PRESENCE.setdefault(directory, Presence(directory))
        presence.join()
        threads = fair_threads(usable_cores(), presence.count(), others_busy)
    if torch.get_num_threads() != threads:
        log.debug("torch threads %d -> %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads
