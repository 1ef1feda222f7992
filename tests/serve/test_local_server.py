"""kdsearch.serve.local_server: ports, the log's last line, stopping a server's process group, and
starting a server until it answers (a real ``python -m http.server``)."""

from __future__ import annotations

import errno
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kdsearch.errors import ConfigError, KdsearchError
from kdsearch.serve import local_server
from kdsearch.serve.local_server import (
    HOST,
    LocalServer,
    answers,
    check_port_free,
    free_port,
    last_line,
    start_server,
)


class ServerError(KdsearchError):
    pass


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """The temporary folder start_server makes its log folder in."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", HOST]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


# --- ports --------------------------------------------------------------------------------------


def test_free_port_can_be_bound():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as probe:
        probe.bind((HOST, port))


@pytest.mark.parametrize("error", [ConfigError, ServerError])
def test_a_port_in_use_raises_the_callers_error(error):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(error) as raised:
            check_port_free(port, error)
    assert str(raised.value) == f"--port {port} is in use on 127.0.0.1; pick another, or 0 for a free one"
    check_port_free(port, error)  # closed: free again


def test_a_port_that_cannot_be_bound_for_another_reason():
    # 192.0.2.0/24 is TEST-NET-1: no interface here has that address.
    with pytest.raises(ServerError, match=r"^--port 8080 cannot be used on 192\.0\.2\.1: \w"):
        check_port_free(8080, ServerError, host="192.0.2.1")


def test_a_port_left_in_time_wait_by_an_earlier_server_is_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server and uvicorn bind
        listener.bind((HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection((HOST, port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its port goes into TIME_WAIT
    time.sleep(0.05)
    client.close()
    with socket.socket() as plain:
        try:
            plain.bind((HOST, port))
        except OSError as failure:
            assert failure.errno == errno.EADDRINUSE  # only SO_REUSEADDR may bind it now
        else:
            pytest.skip("the port did not stay in TIME_WAIT here")
    check_port_free(port, ServerError)


# --- answers, last_line ----------------------------------------------------------------------------


def test_answers_only_a_200():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://{HOST}:{server.server_port}"
        assert answers(url + "/ok") and not answers(url + "/missing")
    finally:
        server.shutdown()
        server.server_close()
    assert not answers(f"http://{HOST}:{free_port()}/ok")  # nobody listening


def test_last_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"starting\n  Traceback...\n  OSError: [Errno 98] Address already in use  \n\n   \n")
    assert last_line(log) == "OSError: [Errno 98] Address already in use"
    log.write_bytes(b"")
    assert last_line(log) == ""
    log.write_bytes(b"bad byte \xff here\n")
    assert last_line(log) == "bad byte \ufffd here"


# --- LocalServer: stop, wait, with ----------------------------------------------------------------


def test_stop_ends_the_process_group_and_wait_gives_the_exit_code():
    process = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True)
    child = int(process.stdout.readline())
    server = LocalServer("http://127.0.0.1:1", process)
    server.stop()
    assert server.wait() == -signal.SIGTERM
    process.stdout.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)  # the shell's child too: the whole group got the signal
    server.stop()  # stopping again, or a server that has exited, is nothing to do


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie waiting to be reaped has ended


def test_a_server_that_was_already_running_has_nothing_to_stop():
    server = LocalServer("http://mlflow:5000", None)
    server.stop()
    assert server.wait() is None


class _Stubborn:
    """A process that ignores SIGTERM: wait(15) times out; after SIGKILL it is gone."""

    pid = 4242

    def __init__(self):
        self.waits = []

    def poll(self):
        return None if len(self.waits) < 2 else -9

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if len(self.waits) == 1:
            raise subprocess.TimeoutExpired("server", timeout)
        return -9


def test_stop_kills_a_server_that_ignores_sigterm_after_15_s(monkeypatch):
    sent = []
    monkeypatch.setattr(local_server.os, "killpg", lambda pid, number: sent.append((pid, number)))
    process = _Stubborn()
    LocalServer("http://127.0.0.1:1", process).stop()
    assert sent == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)] and process.waits == [15, None]


def test_stop_of_a_group_that_is_gone_already(monkeypatch):
    def gone(pid, number):
        raise ProcessLookupError

    monkeypatch.setattr(local_server.os, "killpg", gone)
    process = _Stubborn()
    LocalServer("http://127.0.0.1:1", process).stop()
    assert process.waits == []


def test_a_clean_exit_removes_the_log_folder(tmp_path):
    log_path = tmp_path / "kdsearch-ui-x" / "server.log"
    log_path.parent.mkdir()
    log_path.write_text("started\n")
    process = _sleeper()
    with LocalServer("http://127.0.0.1:1", process, log_path) as server:
        assert server.process is process
    assert process.poll() == -signal.SIGTERM and not log_path.parent.exists()


def test_an_error_in_the_with_block_keeps_the_log_folder(tmp_path):
    log_path = tmp_path / "kdsearch-ui-x" / "server.log"
    log_path.parent.mkdir()
    log_path.write_text("started\n")
    process = _sleeper()
    with pytest.raises(RuntimeError, match="browser crashed"):
        with LocalServer("http://127.0.0.1:1", process, log_path):
            raise RuntimeError("browser crashed")
    assert process.poll() == -signal.SIGTERM and log_path.read_text() == "started\n"


# --- start_server ----------------------------------------------------------------------------------


def test_start_server_waits_until_it_answers(temp_dir):
    made = []

    def wrap(url, process, log_path):
        made.append((url, process, log_path))
        return LocalServer(url, process, log_path)

    server = start_server("the test server", _http_server, "/", wrap, ServerError, timeout=20)
    try:
        [(url, process, log_path)] = made
        assert server.url == url and url.startswith(f"http://{HOST}:") and server.process is process
        assert answers(url + "/") and process.poll() is None
        assert log_path.name == "server.log" and log_path.parent.parent == temp_dir
        assert log_path.parent.name.startswith("kdsearch-server-")
        assert os.getpgid(process.pid) == process.pid  # a process group of its own
    finally:
        server.__exit__(None, None, None)
    assert process.poll() is not None and not log_path.parent.exists()


def test_start_server_on_a_port_in_use_starts_nothing(temp_dir):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"--port {port} is in use on 127.0.0.1"):
            start_server("the test server", _http_server, "/", LocalServer, ServerError, port=port)
    assert list(temp_dir.iterdir()) == []


def test_start_server_takes_another_port_when_its_free_one_was_taken_meanwhile(temp_dir, monkeypatch):
    with socket.socket() as taken:
        taken.bind((HOST, 0))  # bound, not listening: the first server cannot bind it, and nothing answers there
        ports = [taken.getsockname()[1], free_port()]
        monkeypatch.setattr(local_server, "free_port", lambda: ports.pop(0))
        started = []
        server = start_server(
            "the test server",
            lambda port: started.append(port) or _http_server(port),
            "/",
            LocalServer,
            ServerError,
            timeout=20,
        )
    try:
        assert len(started) == 2 and server.url == f"http://{HOST}:{started[1]}" and answers(server.url + "/")
        assert "Address already in use" in server.log_path.read_text()  # the first start's traceback
    finally:
        server.stop()


def test_a_server_that_exits_is_reported_with_its_logs_last_line(temp_dir):
    failing = [
        sys.executable,
        "-c",
        "import sys; print('starting'); print('boom: no database', flush=True); sys.exit(3)",
    ]
    with pytest.raises(ServerError) as raised:
        start_server("the test server", lambda port: failing, "/", LocalServer, ServerError, attempts=2)
    [folder] = temp_dir.iterdir()
    log_path = folder / "server.log"
    assert str(raised.value) == f"the test server did not start: boom: no database (log: {log_path})"
    assert log_path.read_text() == "starting\nboom: no database\n" * 2  # two starts, one log, kept


def test_a_server_that_never_answers_is_stopped_after_the_timeout(temp_dir):
    processes = []

    def wrap(url, process, log_path):
        processes.append(process)
        return LocalServer(url, process, log_path)

    started = time.monotonic()
    with pytest.raises(
        ServerError, match=r"the test server did not start: no answer from http://127\.0\.0\.1:\d+ within 1s"
    ):
        start_server(
            "the test server", lambda port: ["sleep", "60"], "/", wrap, ServerError, port=free_port(), timeout=1
        )
    assert time.monotonic() - started < 5
    [process] = processes  # a port given: one attempt
    assert process.poll() == -signal.SIGTERM
