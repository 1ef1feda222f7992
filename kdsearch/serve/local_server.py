"""A browsing server started by kdsearch (the MLflow UI, optuna-dashboard): on 127.0.0.1 only, in a process
group of its own, on a free port (another one when it was taken meanwhile), up once it answers, and its log's
last line as the reason when it does not."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdsearch.errors import KdsearchError

HOST = "127.0.0.1"


@dataclass
class LocalServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen | None  # None for a server that was already running: nothing to stop
    log_path: Path | None = None  # the server's output, in a temporary folder of its own

    def wait(self) -> int | None:
        """Block until the server exits (Ctrl-C stops the caller, and ``stop`` the server); its exit code."""
        return self.process.wait() if self.process is not None else None

    def stop(self) -> None:
        """End the server's process group (a server and the workers it starts): SIGTERM, then SIGKILL after 15 s."""
        for signal_number, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            if self.process is None or self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, signal_number)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        # The log stays where an error pointed at it.
        if self.log_path is not None and exc_type is None:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now (the OS picks it); another process could still take it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port_free(port: int, error: type[KdsearchError], host: str = HOST) -> None:
    """Raise ``error`` when ``port`` cannot be bound: the server would exit with a traceback in its log, seconds later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server binds: a port left in TIME_WAIT by an earlier server is free for it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as failure:
            if failure.errno == errno.EADDRINUSE:
                raise error(f"--port {port} is in use on {host}; pick another, or 0 for a free one") from None
            raise error(f"--port {port} cannot be used on {host}: {failure.strerror}") from None


def answers(url: str) -> bool:
    """Whether ``url`` answers a GET with 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def start_server(
    what: str,
    command: Callable[[int], list[str]],
    probe: str,
    server: Callable[[str, subprocess.Popen, Path], LocalServer],
    error: type[KdsearchError],
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    attempts: int = 3,
) -> LocalServer:
    """Start ``command(port)`` and wait until ``url + probe`` answers; ``server`` wraps the running process.

    ``port`` None picks a free one, and another (up to ``attempts`` starts) when it was taken meanwhile.
    Raises ``error`` with the log's last line when the server does not answer within ``timeout`` seconds.
    """
    if port is not None:
        check_port_free(port, error)
    log_path = Path(tempfile.mkdtemp(prefix=f"kdsearch-{what.split()[-1].lower()}-")) / "server.log"
    reason = ""
    for _ in range(attempts if port is None else 1):
        chosen = port or free_port()
        url = f"http://{HOST}:{chosen}"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command(chosen),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: `stop` ends the server and its workers together
            )
        started = server(url, process, log_path)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if answers(url + probe):
                    return started
                time.sleep(0.3)
        except BaseException:  # Ctrl-C while it starts
            started.stop()
            raise
        started.stop()
        reason = last_line(log_path) or f"no answer from {url} within {timeout:.0f}s"
    raise error(f"{what} did not start: {reason} (log: {log_path})")
