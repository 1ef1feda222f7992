"""`kdsearch dashboard`: optuna-dashboard for a study storage, over its JSON API and in headless Chromium.

The study is written with Optuna directly (a 2 × 2 grid over t and alpha, as `studies/smoke.yaml`'s),
which takes a second where running the smoke study takes tens. The browser test needs what
tests/serve/test_mlflow_ui_browser.py needs and skips (or fails, under KDSEARCH_REQUIRE_BROWSER) the same way.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import optuna
import pytest
import typer
from optuna.distributions import FloatDistribution

from kdsearch.cli import main as cli
from kdsearch.cli.dashboard import register
from kdsearch.serve.dashboard import DashboardServer, api, start_dashboard
from tests.fakes import CLI, interruptible
from tests.serve.browser import page_text, screenshot, wait_for

STUDY = "smoke-grid"
VALUES = {(1.0, 0.1): 0.41, (1.0, 0.5): 0.47, (4.0, 0.1): 0.44, (4.0, 0.5): 0.52}  # (t, alpha) -> val_acc
SPACE = {"t": FloatDistribution(1.0, 4.0), "alpha": FloatDistribution(0.0, 1.0), "p": FloatDistribution(0.0, 1.0)}


@pytest.fixture
def storage(tmp_path) -> str:
    """tmp_path/studies.db with the study STUDY: four complete trials."""
    url = f"sqlite:///{tmp_path}/studies.db"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    for (t, alpha), value in VALUES.items():
        params = {"t": t, "alpha": alpha, "p": 0.5}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=SPACE, value=value))
    return url


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/meta", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _trials(server: DashboardServer) -> dict[int, dict]:
    """The dashboard's trials of STUDY by number, through its JSON API."""
    (summary,) = [s for s in api(server.url, "/api/studies")["study_summaries"] if s["study_name"] == STUDY]
    return {trial["number"]: trial for trial in api(server.url, f"/api/studies/{summary['study_id']}")["trials"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workdir", "{tmp}"], "studies.db: no such file (no study has been created there)"),
        (["--workdir", "{tmp}/nowhere"], "--workdir {tmp}/nowhere does not exist"),
        (["--storage", "sqlite:///{tmp}/nowhere/studies.db"], "directory {tmp}/nowhere does not exist"),
        (["--storage", "sqlite:///{tmp}/empty.db"], "empty.db holds no Optuna studies"),
        (["--storage", "sqlite:///{tmp}/text.db"], "text.db: file is not a database"),
        (["--port", "70000"], "--port must be in [0, 65535] but got 70000"),
        (["--storage", "grpc://127.0.0.1:13000"], "the dashboard reads the database itself; give the one the proxy"),
    ],
)
def test_bad_storage_or_port_is_one_line_exit_2(capsys, tmp_path, args, message):
    (tmp_path / "empty.db").touch()
    (tmp_path / "text.db").write_text("not a database, but longer than a SQLite header: " * 4)
    code, out, err = _run(capsys, ["dashboard", *[arg.format(tmp=tmp_path) for arg in args]])
    assert code == 2 and out == ""
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "studies.db").exists()


def test_unknown_study_names_the_studies_there(capsys, storage):
    code, _, err = _run(capsys, ["dashboard", "--storage", storage, "--study", "nope"])
    assert code == 2 and f"no study 'nope' in {storage}; studies there: ['{STUDY}']" in err and err.count("\n") == 1


def test_port_in_use_says_so(capsys, storage):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = _run(capsys, ["dashboard", "--storage", storage, "--port", str(port)])
    assert code == 2 and f"--port {port} is in use on 127.0.0.1" in err and err.count("\n") == 1


@pytest.mark.slow
def test_api_lists_the_study_and_its_trials_and_stop_ends_the_server(storage):
    with start_dashboard(storage) as server:
        assert server.url.startswith("http://127.0.0.1:")
        trials = _trials(server)
    assert server.process.poll() is not None and not _answers(server.url)
    assert len(trials) == len(VALUES)
    for trial in trials.values():
        params = {param["name"]: param["param_internal_value"] for param in trial["params"]}
        assert trial["state"] == "Complete" and params["p"] == 0.5
        assert trial["values"] == [VALUES[params["t"], params["alpha"]]], trial["number"]


@pytest.mark.slow
def test_cli_prints_the_urls_and_ctrl_c_stops_the_server(tmp_path, storage):
    process = subprocess.Popen(
        [*CLI, "dashboard", "--workdir", str(tmp_path), "--study", STUDY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"optuna-dashboard for {storage}: http://127.0.0.1:"), lines
        url = lines[0].split(": ", 1)[1].strip()
        assert lines[1].strip() == f"study {STUDY}: {url}/dashboard/studies/1" and lines[2].strip() == "Ctrl-C stops it"
        assert len(api(url, "/api/studies/1")["trials"]) == len(VALUES)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert "Traceback" not in process.stderr.read()
        assert not _answers(url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # the CLI stops its server (in a session of its own) on the way out
            process.wait(timeout=30)


@pytest.mark.slow
def test_ui_with_dashboard_starts_both_on_the_workdirs_stores_and_ctrl_c_stops_both(tmp_path, storage, mlflow_uri):
    process = subprocess.Popen(
        [*CLI, "ui", "--workdir", str(tmp_path), "--dashboard"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"MLflow UI for {mlflow_uri}: http://127.0.0.1:"), lines
        assert lines[1].startswith(f"optuna-dashboard for {storage}: http://127.0.0.1:"), lines
        assert lines[2].strip() == "Ctrl-C stops it"
        ui_url, board_url = (line.split(": ", 1)[1].strip() for line in lines[:2])
        with urllib.request.urlopen(ui_url + "/health", timeout=10) as answer:
            assert answer.status == 200
        assert len(api(board_url, "/api/studies/1")["trials"]) == len(VALUES)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert "Traceback" not in process.stderr.read()
        assert not _answers(board_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)


def test_ui_with_dashboard_refuses_a_workdir_without_studies_before_starting_anything(tmp_path, mlflow_uri, capsys):
    code, printed, err = _run(capsys, ["ui", "--workdir", str(tmp_path), "--dashboard"])
    assert code == 2 and printed == ""
    assert "studies.db: no such file" in err and err.count("\n") == 1


@pytest.mark.browser
def test_browser_shows_the_studys_trials_with_values_and_params(browser, artifacts, storage):  # noqa: F811
    with start_dashboard(storage) as server:
        trials = _trials(server)
        # The trial list with every trial's details open: "Trial N (trial_id=…)", its value, its parameters.
        browser.get(f"{server.url}/dashboard/studies/1/trials?numbers={','.join(map(str, sorted(trials)))}")
        wait_for(browser, lambda d: f"{len(trials)} Trials" in page_text(d), "the study's trial list")
        page = wait_for(
            browser,
            lambda d: all(f"Trial {n} (trial_id=" in (text := page_text(d)) for n in trials) and text,
            "every trial's details",
        )
        screenshot(browser, artifacts / "optuna-dashboard-trials.png")
    assert STUDY in page
    shown = re.split(r"Trial (\d+) \(trial_id=\d+\)", page)[1:]
    details = dict(zip(map(int, shown[::2]), shown[1::2], strict=True))
    for number, trial in trials.items():
        params = {param["name"]: param["param_external_value"] for param in trial["params"]}
        lines = [line.strip() for line in details[number].splitlines()]
        assert str(trial["values"][0]) in lines, (number, lines)
        assert all(f"{name} {value}" in lines for name, value in params.items()), (number, params, lines)


def test_register_adds_the_dashboard_command():
    app = typer.Typer()
    register(app)
    assert [command.name for command in app.registered_commands] == ["dashboard"]
