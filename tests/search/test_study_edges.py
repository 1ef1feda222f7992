"""Unusual study inputs from the bad-input sweep (issue 14): one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.cli.main import main
from kdsearch.config import DataConfig, ModelConfig
from kdsearch.distill.teacher import recipe_config, trained_teacher_fields
from kdsearch.errors import ConfigError
from kdsearch.report.tables import ablation_tables
from kdsearch.search.ablation import AblationTable, ArmRow
from kdsearch.search.optuna_storage import HeartbeatConfig
from kdsearch.search.study import DEFERRED, claim_waiting, defer_queued, open_study, point_key
from kdsearch.search.studyfile import check_study_name, load_study
from kdsearch.search.tune import GRID
from tests.fakes import SMOKE


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "-x", "with space"])
def test_a_study_name_that_is_a_path_is_refused(name, tmp_path, capsys):
    with pytest.raises(ConfigError, match="must be a plain name"):
        check_study_name(name)
    args = ["study", "grid", "--study", str(SMOKE), "--workdir", str(tmp_path), "--study-name", name]
    assert main(args) == 2 and "must be a plain name" in _error(capsys)
    assert not (tmp_path / "studies.db").exists()


@pytest.mark.parametrize(("flag", "value"), [("--max-trials", "-1"), ("--max-trials", "0")])
def test_max_trials_below_one_is_refused(flag, value, tmp_path, capsys):
    assert main(["study", "grid", "--study", str(SMOKE), "--workdir", str(tmp_path), flag, value]) == 2
    assert "--max-trials" in _error(capsys) and not (tmp_path / "studies.db").exists()


def test_a_negative_wait_is_refused(tmp_path, capsys):
    assert main(["study", "worker", "--study-name", "x", "--workdir", str(tmp_path), "--wait", "-5"]) == 2
    assert "--wait" in _error(capsys)


def test_a_directory_given_as_study_file_says_so(tmp_path, capsys):
    assert main(["study", "grid", "--study", str(tmp_path), "--workdir", str(tmp_path)]) == 2
    assert "is a directory" in _error(capsys)


def test_a_set_value_that_does_not_parse_is_one_line(tmp_path, capsys):
    assert main(["study", "grid", "--study", str(SMOKE), "--workdir", str(tmp_path), "--set", "grid.t=[1, 2"]) == 2
    assert "cannot parse value '[1, 2'" in _error(capsys)


@pytest.mark.slow
def test_a_report_of_a_study_without_a_complete_trial_is_written_and_says_so(tmp_path, _mlflow_template):
    storage = f"sqlite:///{tmp_path}/studies.db"
    (tmp_path / "mlruns").mkdir()
    shutil.copy(_mlflow_template, tmp_path / "mlruns" / "mlflow.db")  # as after an interrupted first trial
    handle = open_study(GRID, load_study(SMOKE), storage, HeartbeatConfig(), study_name="queued")
    assert len(handle.trials()) == 4  # queued, none run
    out = tmp_path / "report"
    args = ["report", "--study", "queued", "--workdir", str(tmp_path), "--out", str(out), "--no-ig"]
    assert main(args) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["partial"] and any("no complete trial yet" in note for note in summary["notes"])
    assert (out / "tables" / "trials.csv").exists()


def test_a_synthetic_recipe_teacher_is_shared_by_workers_with_other_data_dirs():
    def fields(data_dir):
        data = DataConfig(dataset="synthetic", data_dir=data_dir)
        return trained_teacher_fields(recipe_config(data, ModelConfig(arch="tiny_cnn")))

    assert fields("/a") == fields("/b") == fields(None)
    folder = [trained_teacher_fields(recipe_config(DataConfig(dataset="folder", data_dir=d))) for d in ("/a", "/b")]
    assert folder[0] != folder[1]  # a folder's images are known by its path here


def test_table3_says_why_a_two_seed_interval_is_so_wide():
    rows = [ArmRow("baseline", 2, 80.0, 0.5, (75.5, 84.5), 0.0, float("nan"), 0.5, 0.2)]
    arms, _ = ablation_tables(AblationTable(85.0, rows, [], "t"), {})
    assert any("12.7 standard errors" in note for note in arms.notes)
    rows[0].n = 3
    arms, _ = ablation_tables(AblationTable(85.0, rows, [], "t"), {})
    assert not any("12.7 standard errors" in note for note in arms.notes)


@pytest.mark.slow
def test_a_finished_study_leaves_no_empty_checkpoint_folders(tmp_path, shared_cache, tiny_teacher_checkpoint):
    args = ["study", "grid", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--t", "1", "--alpha", "0.5", "--p", "0", "--teacher-checkpoint", tiny_teacher_checkpoint]
    args += ["--set", "latency.repeats=1"]
    assert main(args) == 0
    assert not (tmp_path / "checkpoints").exists()
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies.db")


def test_ablate_from_an_ablation_is_refused(tmp_path, capsys):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    study = optuna.create_study(study_name="an-ablation", storage=f"sqlite:///{tmp_path}/studies.db")
    space = {"arm": CategoricalDistribution(["baseline", "kd"]), "seed": IntDistribution(0, 10)}
    study.add_trial(optuna.trial.create_trial(params={"arm": "kd", "seed": 0}, distributions=space, value=80.0))
    args = ["ablate", "--study", str(SMOKE), "--workdir", str(tmp_path), "--from-study", "an-ablation"]
    assert main(args) == 2
    assert "did not search t, alpha, p" in _error(capsys)
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies.db") == ["an-ablation"]  # nothing new


# --- deferring queued trials --------------------------------------------------------------------


def _queued_grid(tmp_path, name="queue"):
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", HeartbeatConfig(), name)
    return handle


def _status(tmp_path, capsys, name="queue") -> dict:
    capsys.readouterr()
    assert main(["study", "status", "--workdir", str(tmp_path), "--study-name", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_defer_takes_matching_queued_trials_out_and_the_studys_command_queues_them_again(tmp_path, capsys):
    handle = _queued_grid(tmp_path)
    taken = claim_waiting(handle)  # a worker runs t=1, alpha=0.1 now: it must stay running
    assert json.loads(point_key(handle.study.trials[taken.number])) == {"alpha": 0.1, "p": 0.5, "t": 1.0}
    args = ["study", "defer", "--workdir", str(tmp_path), "--study-name", "queue", "--where", "t=1,3"]
    assert main([*args, "--reason", "the t=4 points first"]) == 0
    assert "deferred 1 queued trial(s): alpha=0.5 p=0.5 t=1.0" in capsys.readouterr().out
    waiting = [json.loads(point_key(trial))["t"] for trial in handle.trials() if trial.state == TrialState.WAITING]
    assert waiting == [4.0, 4.0]
    deferred = [trial for trial in handle.trials() if trial.state == TrialState.FAIL]
    assert [trial.user_attrs[DEFERRED] for trial in deferred] == ["the t=4 points first"]
    assert handle.study.trials[taken.number].state == TrialState.RUNNING
    status = _status(tmp_path, capsys)
    assert status["deferred"] == [
        {"trial": deferred[0].number, "point": {"alpha": 0.5, "p": 0.5, "t": 1.0}, "reason": "the t=4 points first"}
    ]
    assert main(["study", "status", "--workdir", str(tmp_path), "--study-name", "queue"]) == 0
    text = capsys.readouterr().out
    assert f"deferred: trial {deferred[0].number}  alpha=0.5 p=0.5 t=1.0  (the t=4 points first)" in text
    # Workers joining the study run the queue as it is; opening it with its command queues the point again.
    reopened = _queued_grid(tmp_path)
    assert [trial.state for trial in reopened.trials()].count(TrialState.WAITING) == 3
    assert _status(tmp_path, capsys)["deferred"] == []
    # Deferred again, the point is listed once, with its latest reason.
    args = ["study", "defer", "--workdir", str(tmp_path), "--study-name", "queue", "--where", "alpha=0.5"]
    assert main([*args, "--reason", "again"]) == 0
    again = _status(tmp_path, capsys)["deferred"]
    assert [(entry["point"], entry["reason"]) for entry in again] == [
        ({"alpha": 0.5, "p": 0.5, "t": 4.0}, "again"),  # in trial order: this one was queued first
        ({"alpha": 0.5, "p": 0.5, "t": 1.0}, "again"),
    ]


@pytest.mark.parametrize(
    ("where", "reason", "message"),
    [
        (["t=4", "beta=1"], "why", "points have ['alpha', 'p', 't']; match on those (not beta)"),
        (["t=7"], "why", "no queued trial of study queue matches {'t': [7]}"),
        (["t"], "why", "--where takes KEY=V1,V2 but got 't'"),
        (["t=4"], " ", "say why the trials are deferred (--reason)"),
    ],
)
def test_a_defer_that_matches_nothing_or_gives_no_reason_is_one_line_exit_2_and_changes_nothing(
    where, reason, message, tmp_path, capsys
):
    handle = _queued_grid(tmp_path)
    args = ["study", "defer", "--workdir", str(tmp_path), "--study-name", "queue", "--reason", reason]
    assert main([*args, *[arg for item in where for arg in ("--where", item)]]) == 2
    assert message in _error(capsys)
    assert {trial.state for trial in handle.trials()} == {TrialState.WAITING}


@pytest.mark.slow
def test_a_report_says_which_points_are_deferred_and_does_not_count_them_as_failed(tmp_path, _mlflow_template):
    (tmp_path / "mlruns").mkdir()
    shutil.copy(_mlflow_template, tmp_path / "mlruns" / "mlflow.db")
    handle = _queued_grid(tmp_path)
    handle.study.tell(claim_waiting(handle), state=TrialState.FAIL)  # a real failure
    defer_queued(f"sqlite:///{tmp_path}/studies.db", "queue", {"t": [4.0], "alpha": [0.5]}, "later")
    out = tmp_path / "report"
    args = ["report", "--study", "queue", "--workdir", str(tmp_path), "--out", str(out), "--no-ig"]
    assert main(args) == 0
    progress = json.loads((out / "report.json").read_text())["progress"]
    assert progress == (
        "partial: 0 of 4 grid points complete; 0 running, 2 queued; 1 deferred (taken out of the queue: later); "
        "1 failed trial(s) (each queued again)"
    )


def test_status_counts_deferred_trials_as_deferred_not_failed(tmp_path, capsys):
    handle = _queued_grid(tmp_path)
    handle.study.tell(claim_waiting(handle), state=TrialState.FAIL)  # a real failure
    defer_queued(f"sqlite:///{tmp_path}/studies.db", "queue", {"t": [4.0]}, "later")
    states = _status(tmp_path, capsys)["states"]
    assert (states["FAIL"], states["DEFERRED"], states["WAITING"]) == (1, 2, 1)
    assert main(["study", "status", "--workdir", str(tmp_path), "--study-name", "queue"]) == 0
    assert "  trials: fail 1, waiting 1, deferred 2\n" in capsys.readouterr().out
