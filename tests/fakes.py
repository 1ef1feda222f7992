"""The fakes every test shares: tiny configs, the study files, the CLI in a fresh process.

The fixtures built from them live in tests/conftest.py."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kdsearch.config import DataConfig, ModelConfig
from kdsearch.errors import StudyError
from kdsearch.infra.storage import check_database

TINY = ModelConfig(arch="tiny_cnn")
TINY_STUDENT = ModelConfig(arch="tiny_cnn", drop_blocks=1)
SYNTHETIC = DataConfig(dataset="synthetic", synthetic_size=400, val_size=100)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the data, teacher and references beside the checkout, where they are
SMOKE = REPO / "studies" / "smoke.yaml"
CPU_QUICK = REPO / "studies" / "cpu-quick.yaml"
PAPER = REPO / "studies" / "paper-cifar10.toml"
# One line of Python that runs the real CLI in a fresh process, as a user's shell would.
CLI = [sys.executable, "-c", "import sys; from kdsearch.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def interruptible() -> None:
    """``preexec_fn`` of a command a test stops with SIGINT, as a terminal's Ctrl-C would: a suite started
    in the background of a shell without job control runs with SIGINT ignored, and children inherit it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def storage_proxy(storage: str) -> Iterator[str]:
    """``kdsearch storage-proxy`` for ``storage`` on a free port of 127.0.0.1, as a user starts it; yields
    the grpc://… address it prints once it is ready, and stops it (SIGTERM) at the end."""
    args = ["storage-proxy", "--storage", storage, "--port", "0"]
    proxy = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proxy.stdout.readline()  # printed when the checks pass, just before it serves
        assert "--storage grpc://" in line, line + proxy.stdout.read()
        address = line.split("--storage ", 1)[1].split(";", 1)[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                check_database(address)  # waits up to 5 s for the server to start answering
                break
            except StudyError:
                assert time.monotonic() < deadline, "the storage proxy did not answer in 30 s"
        yield address
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
