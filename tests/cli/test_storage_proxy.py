"""``kdsearch storage-proxy``: bad input refused in one line before anything is written, and a study run
end to end through the proxy by the study commands, as workers on other machines would."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from kdsearch.cli.main import main
from tests.fakes import CLI, SMOKE, storage_proxy


def _files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage", "grpc://127.0.0.1:13000"], "a storage proxy serves a database, not another proxy"),
        (["--threads", "0"], "--threads must be >= 1 but got 0"),
        (["--port", "70000"], "--port must be in [0, 65535] but got 70000"),
        (["--storage", "sqlite:///{tmp}/missing/studies.db"], "directory {tmp}/missing does not exist"),
        (["--workdir", "{tmp}/missing"], "--workdir {tmp}/missing does not exist"),
        (["--storage", "postgresql://kd@127.0.0.1:1/optuna"], "cannot reach storage postgresql+psycopg"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code = main(["storage-proxy", *[arg.format(tmp=tmp_path) for arg in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert _files(tmp_path) == []


def test_a_port_in_use_is_refused_before_serving(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["storage-proxy", "--storage", f"sqlite:///{tmp_path}/studies.db", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"--port {port} is in use on 127.0.0.1" in err and err.count("\n") == 1
    assert _files(tmp_path) == []


@pytest.mark.slow
def test_a_grid_study_runs_and_is_reported_through_the_proxy(tmp_path, shared_cache):
    database = tmp_path / "db" / "studies.db"
    database.parent.mkdir()
    with storage_proxy(f"sqlite:///{database}") as address:
        assert address.startswith("grpc://127.0.0.1:")
        args = ["study", "grid", "--study", str(SMOKE), "--storage", address, "--study-name", "via-proxy"]
        args += ["--set", "latency.repeats=1", "--no-progress", "--heartbeat-interval", "1", "--grace-period", "5"]
        grid = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert grid.returncode == 0, grid.stderr
        assert f"study via-proxy in {address}: 0 of 4 grid points already complete; 4 to run" in grid.stdout
        status = subprocess.run(
            [*CLI, "study", "status", "--storage", address, "--json"], capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert (report["study"], report["done"], report["total"]) == ("via-proxy", 4, 4)
        assert report["states"]["COMPLETE"] == 4 and report["best"]["run_id"]
        args = ["report", "--study", "via-proxy", "--storage", address, "--out", "report", "--no-log"]
        made = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert made.returncode == 0, made.stderr
        assert len((tmp_path / "report" / "tables" / "trials.csv").read_text().splitlines()) == 1 + 4
    # The proxy wrote where it was told, and the study commands wrote no storage of their own.
    assert database.is_file() and not (tmp_path / "studies.db").exists()
