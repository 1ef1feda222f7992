from __future__ import annotations

import re
import time

import optuna
import pytest
import torch
from mlflow.exceptions import MlflowException, RestException
from optuna.trial import TrialState

from kdsearch.cli.main import main
from kdsearch.data.datasets import load_splits
from kdsearch.errors import ConfigError, StudyError, TrainingDiverged
from kdsearch.infra.device import resolve_precision
from kdsearch.infra.storage import check_database, database_url
from kdsearch.models.classifiers import load_model
from kdsearch.models.inference import accuracy
from kdsearch.search.kinds import STUDY_KINDS
from kdsearch.search.optuna_storage import HeartbeatConfig
from kdsearch.search.study import (
    RunSummary,
    _Heartbeat,
    _tell,
    claim_waiting,
    fastest_within,
    join_study,
    open_study,
    run_study,
    run_trials,
    study_identity,
    summarize,
)
from kdsearch.search.studyfile import Pruner, load_study
from kdsearch.search.trial import PRECISION_NAMES
from kdsearch.search.tune import GRID, PRUNERS, TPE
from kdsearch.track.tracking import MemoryTracker
from tests.fakes import SMOKE

# The listed params and metrics, which every nested run must carry.
RUN_PARAMS = {"kd.temperature", "kd.alpha", "overlay.p", "seed", "epochs", "optim.lr", "batch_size"}
RUN_PARAMS |= {"student.drop_blocks", "data.name", "data.train_images", "data.val_images", "data.test_images"}
RUN_PARAMS |= {"teacher_hash", "ig_cache_key"}
RUN_METRICS = {
    "train_loss",
    "val_acc",
    "test_acc",
    "teacher_test_acc",
    "student_params",
    "teacher_params",
    "compression_factor",
    "student_flops",
    "teacher_flops",
    "student_size_bytes",
    "teacher_size_bytes",
    "latency_ms_teacher_b1",
    "latency_ms_teacher_b128",
    "latency_ms_student_b1",
    "latency_ms_student_b128",
    "latency_threads",
}
FAST = HeartbeatConfig(interval=1, grace=3)


def _points(study: optuna.Study) -> list[tuple]:
    return sorted(tuple(sorted(t.params.items())) for t in study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.slow
def test_smoke_grid_end_to_end_and_rerun_adds_nothing(tmp_path, mlflow_uri, shared_cache, capsys):
    from mlflow import MlflowClient

    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["study", "grid", "--study", str(SMOKE), "--storage", storage, "--tracking-uri", mlflow_uri]
    args += ["--set", "latency.repeats=1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 of 4 grid points already complete; 4 to run" in out

    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert _points(study) == [
        (("alpha", a), ("p", 0.5), ("t", t)) for a, t in [(0.1, 1.0), (0.1, 4.0), (0.5, 1.0), (0.5, 4.0)]
    ]

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kdsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    trials = {t.number: t for t in study.trials}
    splits = load_splits(load_study(SMOKE).train.data, shared_cache)
    for run in children:
        assert RUN_PARAMS <= set(run.data.params), RUN_PARAMS - set(run.data.params)
        assert RUN_METRICS <= set(run.data.metrics), RUN_METRICS - set(run.data.metrics)
        assert {"git_commit", "device", "torch_version"} <= set(run.data.tags)
        resolved = resolve_precision(run.data.params["precision"], torch.device("cpu"))  # "auto" made concrete
        assert run.data.tags["precision_resolved"] == PRECISION_NAMES[resolved]
        assert run.data.params["data.name"] == "synthetic" and run.data.params["data.train_images"] == "300"
        assert run.data.metrics["compression_factor"] > 1
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "model.pt"}
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
        # The trial's value and test accuracy are those of the student it logged, on the smoke study's
        # splits (fp32, as smoke.yaml trains; channels_last and batches of 500, as training evaluated it).
        trial = trials[int(run.data.tags["optuna.trial"])]
        folder = tmp_path / "downloads" / run.info.run_id
        folder.mkdir(parents=True)
        student, _ = load_model(client.download_artifacts(run.info.run_id, "model.pt", str(folder)))
        student = student.to(memory_format=torch.channels_last)
        val = accuracy(student, splits.val_images, splits.val_labels, 500, torch.device("cpu"), None)
        test = accuracy(student, splits.test_images, splits.test_labels, 500, torch.device("cpu"), None)
        assert trial.value == run.data.metrics["val_acc"] == val
        assert trial.user_attrs["test_acc"] == run.data.metrics["test_acc"] == test
    assert parent.info.status == "FINISHED"

    assert main(args) == 0
    assert "4 of 4 grid points already complete; nothing to run" in capsys.readouterr().out
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == 4
    assert len(client.search_runs([experiment.experiment_id])) == 5


@pytest.mark.slow
def test_interrupted_grid_resumes_with_the_remaining_points(tmp_path, mlflow_uri, shared_cache, capsys):
    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["study", "grid", "--study", str(SMOKE), "--storage", storage, "--tracking-uri", mlflow_uri]
    args += ["--t", "1,2", "--alpha", "0.5", "--p", "0.5", "--set", "latency.repeats=1", "--no-progress"]
    assert main([*args, "--max-trials", "1"]) == 0
    assert main(args) == 0
    assert "1 of 2 grid points already complete; 1 to run" in capsys.readouterr().out
    [summary] = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 2


@pytest.mark.slow
def test_status_and_best(tmp_path, mlflow_uri, shared_cache, capsys):
    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["study", "grid", "--study", str(SMOKE), "--storage", storage, "--tracking-uri", mlflow_uri]
    assert main([*args, "--t", "1", "--alpha", "0.5", "--p", "0.5", "--set", "latency.repeats=1"]) == 0
    capsys.readouterr()
    assert main(["study", "status", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "(grid): 1 of 1 complete" in out and "complete 1" in out and "best: trial 0" in out
    assert main(["study", "best", "--storage", storage]) == 0
    assert '"val_acc"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--t", "1,abc"], "--t takes comma-separated numbers but got 'abc'"),
        (["--alpha", "0.1,1.5"], r"grid alpha must be in \[0, 1\] but got 1.5"),
        (["--p", "-0.5"], r"grid p must be in \[0, 1\] but got -0.5"),
        (["--set", "train.epohcs=2"], "epohcs"),
        (["--storage", "postgresql://nobody:secret@127.0.0.1:9/kd"], "cannot reach storage postgresql"),
        (["--storage", "sqlite:////no/such/dir/studies.db"], "directory /no/such/dir does not exist"),
        (["--storage", "not a url"], "is not a database URL"),
        (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow server"),
        (["--teacher-checkpoint", "missing.pt"], "missing.pt does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["study", "grid", "--study", str(SMOKE), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "secret" not in err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []  # no studies.db, no mlruns/


def test_unknown_study_file_key_is_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    study = tmp_path.parent / f"{tmp_path.name}-bad.yaml"
    study.write_text(SMOKE.read_text() + "\nsearch: {t: [1]}\n")
    assert main(["study", "grid", "--study", str(study)]) == 2
    assert "unknown study file key(s) ['search']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_study_name_is_derived_from_spec_and_grid():
    spec = load_study(SMOKE)
    other = load_study(SMOKE, {"grid.t": [1.0, 2.0]})
    space = {"t": [1.0], "alpha": [0.1], "p": [0.5]}
    assert study_identity(spec, GRID, space) == study_identity(load_study(SMOKE), GRID, space)
    assert study_identity(spec, GRID, space) != study_identity(spec, GRID, {**space, "t": [2.0]})
    assert study_identity(spec, GRID, space) != study_identity(other, GRID, space)
    # Where the cache lives or which device runs it does not change what a trial computes.
    moved = load_study(SMOKE, {"train.cache_dir": "/elsewhere", "train.device": "cpu"})
    assert study_identity(moved, GRID, space) == study_identity(spec, GRID, space)


def test_a_name_taken_by_another_grid_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    open_study(GRID, load_study(SMOKE), storage, FAST, study_name="mine")
    with pytest.raises(StudyError, match="already exists with a different spec"):
        open_study(GRID, load_study(SMOKE, {"grid.t": [2.0, 3.0]}), storage, FAST, study_name="mine")


def test_claims_are_exclusive(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    handle = open_study(GRID, load_study(SMOKE), storage, FAST)
    other_worker = join_study(handle.name, storage, FAST, STUDY_KINDS)
    claimed = [claim_waiting(handle), claim_waiting(other_worker), claim_waiting(handle), claim_waiting(other_worker)]
    assert len({trial.number for trial in claimed}) == 4
    assert claim_waiting(handle) is None and claim_waiting(other_worker) is None
    assert len({tuple(sorted(t.system_attrs["fixed_params"].items())) for t in handle.trials()}) == 4


def test_a_claim_records_the_heartbeat_before_it_takes_the_trial(tmp_path, monkeypatch):
    # So a worker that dies (or whose storage fails) right after the take leaves a trial that goes stale.
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", FAST)
    calls = []
    beat, take = handle.storage.record_heartbeat, handle.storage.set_trial_state_values
    monkeypatch.setattr(handle.storage, "record_heartbeat", lambda trial_id: calls.append("beat") or beat(trial_id))
    monkeypatch.setattr(handle.storage, "set_trial_state_values", lambda *a, **k: calls.append("take") or take(*a, **k))
    claim_waiting(handle)
    assert calls == ["beat", "take"]


def test_a_claim_moves_on_from_a_trial_another_worker_is_taking(tmp_path, monkeypatch):
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", FAST)
    first, second = [trial._trial_id for trial in handle.trials((TrialState.WAITING,))][:2]
    beat = handle.storage.record_heartbeat

    def contended(trial_id):  # the first heartbeat row of `first` is being written by another worker
        if trial_id == first:
            raise optuna.exceptions.StorageInternalError("duplicate key value violates unique constraint")
        beat(trial_id)

    monkeypatch.setattr(handle.storage, "record_heartbeat", contended)
    claimed = claim_waiting(handle)
    assert claimed._trial_id == second and handle.storage.get_trial(first).state == TrialState.WAITING


@pytest.mark.slow
def test_a_heartbeat_thread_outlives_a_failing_beat(tmp_path, monkeypatch):
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", FAST)
    trial = claim_waiting(handle)
    beats = []

    def flaky(trial_id):  # the storage restarting under the first beat
        beats.append(trial_id)
        if len(beats) == 1:
            raise optuna.exceptions.StorageInternalError("server closed the connection unexpectedly")

    monkeypatch.setattr(handle.storage, "record_heartbeat", flaky)
    with _Heartbeat(handle, trial):
        time.sleep(FAST.interval * 1.5)
    assert len(beats) == 2


def test_a_trial_failed_by_another_worker_while_it_is_told_is_left_to_its_retry(tmp_path, monkeypatch, caplog):
    # Another worker took it for dead (heartbeats starved on a loaded machine) between tell's look at its
    # state and tell's write: seen in bench/load_faults.py with 32 workers on 2 cores.
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", FAST)
    trial = claim_waiting(handle)
    handle.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    monkeypatch.setattr(
        handle.study,
        "tell",
        lambda *a, **k: handle.storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0]),
    )
    _tell(handle, trial, 1.0)
    assert f"trial {trial.number} was failed by another worker meanwhile" in caplog.text
    assert handle.storage.get_trial(trial._trial_id).state == TrialState.FAIL


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (optuna.exceptions.StorageInternalError("server closed the connection unexpectedly"), TrialState.RUNNING),
        (
            MlflowException(
                "API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'"
            ),
            TrialState.RUNNING,
        ),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad param"}), TrialState.FAIL),
        (RuntimeError("a bug in the objective"), TrialState.FAIL),
    ],
)
def test_a_failing_storage_or_tracking_server_leaves_the_trial_to_be_retried_other_errors_fail_it(
    tmp_path, error, state
):
    # A database restart under the objective's storage calls is the worker's trouble, not the trial's: the
    # trial goes stale and is queued again, where FAIL would lose its point (seen in bench/load_faults.py).
    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", FAST)

    def objective(trial):
        raise error

    with pytest.raises(type(error)):
        run_trials(handle, objective, progress=False, max_trials=1)
    assert [trial.state for trial in handle.trials() if trial.state != TrialState.WAITING] == [state]


def test_reopening_queues_only_points_without_a_live_trial(tmp_path):
    storage = f"sqlite:///{tmp_path}/studies.db"
    handle = open_study(GRID, load_study(SMOKE), storage, FAST)
    first = claim_waiting(handle)
    handle.study.tell(first, state=TrialState.FAIL)
    reopened = open_study(GRID, load_study(SMOKE), storage, FAST)
    states = [trial.state for trial in reopened.trials()]
    assert states.count(TrialState.WAITING) == 4 and states.count(TrialState.FAIL) == 1


@pytest.mark.slow
def test_a_dead_workers_trial_is_retried_and_every_point_completes_once(
    tmp_path, shared_cache, smoke_overrides, tiny_teacher_checkpoint
):
    """A worker that stops sending heartbeats mid-trial (SIGKILL, lost machine): its trial goes stale."""
    storage = f"sqlite:///{tmp_path}/studies.db"
    overrides = {**smoke_overrides, "teacher": {"checkpoint": tiny_teacher_checkpoint}}
    spec = load_study(SMOKE, {**overrides, "grid.t": [1.0, 2.0], "grid.alpha": [0.5]})
    handle = open_study(GRID, spec, storage, FAST)
    dead = claim_waiting(handle)
    study_id = handle.storage.get_study_id_from_name(handle.name)
    handle.storage.record_heartbeat(handle.storage.get_trial_id_from_study_id_trial_number(study_id, dead.number))
    # It was killed after creating its MLflow run and before recording the run's id on the trial.
    tracker = MemoryTracker()
    parent = tracker.parent_run(spec.name, handle.name, handle.name, {})
    orphan = tracker.start_run(spec.name, f"trial-{dead.number}", parent, {"optuna.trial": str(dead.number)})
    start = time.monotonic()
    summary = run_study(join_study(handle.name, storage, FAST, STUDY_KINDS), tracker, progress=False)
    assert time.monotonic() - start >= FAST.grace - 1  # it waited for the dead trial to go stale
    assert summary.done == 2 and summary.counts["COMPLETE"] == 2 and summary.counts["FAIL"] == 1
    assert len(_points(handle.study)) == 2
    [retry] = [t for t in handle.trials((TrialState.COMPLETE,)) if "failed_trial" in t.system_attrs]
    assert retry.system_attrs["failed_trial"] == dead.number
    assert tracker.runs[orphan].status == "FAILED" and tracker.runs[orphan].tags["kdsearch.state"] == "WORKER_DIED"
    assert [run.status for run in tracker.children(parent)] == ["FAILED", "FINISHED", "FINISHED"]


@pytest.mark.slow
def test_worker_joins_and_finishes_an_existing_study(tmp_path, mlflow_uri, shared_cache, capsys):
    storage = f"sqlite:///{tmp_path}/studies.db"
    handle = open_study(GRID, load_study(SMOKE, {"grid.t": [1.0], "latency.repeats": 1}), storage, FAST)
    args = ["study", "worker", "--study-name", handle.name, "--storage", storage, "--tracking-uri", mlflow_uri]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "joined grid study" in out and "2 of 2 complete (2 run now)" in out
    assert main(["study", "worker", "--study-name", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_tpe_with_pruning_runs_its_budget_and_resumes(tmp_path, shared_cache, smoke_overrides, tiny_teacher_checkpoint):
    storage = f"sqlite:///{tmp_path}/studies.db"
    overrides = {**smoke_overrides, "teacher": {"checkpoint": tiny_teacher_checkpoint}, "train.epochs": 2}
    overrides |= {"tpe.trials": 3, "tpe.startup_trials": 1, "tpe.lr": [1e-4, 1e-2], "tpe.student_drop": [1, 2]}
    spec = load_study(SMOKE, overrides)
    tracker = MemoryTracker()
    summary = run_study(open_study(TPE, spec, storage, FAST), tracker, progress=False)
    assert summary.done == 3 and summary.counts["COMPLETE"] + summary.counts["PRUNED"] == 3
    trials = optuna.load_study(study_name=_tpe_name(storage), storage=storage).trials
    assert all({"t", "alpha", "p", "lr", "student_drop"} <= set(t.params) for t in trials)
    assert all(t.intermediate_values for t in trials)  # the pruner was fed every epoch
    again = run_study(open_study(TPE, spec, storage, FAST), tracker, progress=False)
    assert again.ran == 0 and again.done == 3
    parent = next(run_id for run_id, run in tracker.runs.items() if run.parent_id is None)
    assert len(tracker.children(parent)) == 3


def _tpe_name(storage: str) -> str:
    [summary] = optuna.get_all_study_summaries(storage)
    return summary.study_name


def test_check_database_writes_nothing(tmp_path):
    check_database(f"sqlite:///{tmp_path}/new.db")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StudyError, match="no such file"):
        check_database(f"sqlite:///{tmp_path}/new.db", must_exist=True)
    assert database_url("postgresql://u@h/db").startswith("postgresql+psycopg")
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_studies_select_on_validation_so_they_need_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="val_size must be > 0"):
        open_study(GRID, load_study(SMOKE, {"train.data.val_size": 0}), f"sqlite:///{tmp_path}/s.db", FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_failed_trial_run_again_resumes_from_its_last_epoch(
    tmp_path, shared_cache, smoke_overrides, tiny_teacher_checkpoint, monkeypatch
):
    import kdsearch.search.trial

    storage = f"sqlite:///{tmp_path}/studies.db"
    overrides = {**smoke_overrides, "teacher": {"checkpoint": tiny_teacher_checkpoint}, "train.epochs": 3}
    spec = load_study(SMOKE, {**overrides, "grid.t": [1.0], "grid.alpha": [0.5], "grid.p": [0.5]})
    real_train = kdsearch.search.trial.train
    epochs_trained: list[int] = []

    def train(config, on_epoch, **kwargs):
        def record(epoch, row):
            on_epoch(epoch, row)
            epochs_trained.append(epoch)
            if die_after is not None and epoch == die_after:
                raise RuntimeError("the worker died")  # after this epoch's checkpoint was written

        return real_train(config, on_epoch=record, **kwargs)

    monkeypatch.setattr(kdsearch.search.trial, "train", train)
    checkpoints = tmp_path / "checkpoints"
    die_after = 0
    with pytest.raises(RuntimeError, match="the worker died"):
        run_study(open_study(GRID, spec, storage, FAST), MemoryTracker(), progress=False, checkpoint_root=checkpoints)
    assert [path.name for path in checkpoints.rglob("last.pt")] == ["last.pt"]

    die_after, epochs_trained[:] = None, []
    tracker = MemoryTracker()
    summary = run_study(open_study(GRID, spec, storage, FAST), tracker, progress=False, checkpoint_root=checkpoints)
    assert summary.counts["COMPLETE"] == 1 and summary.counts["FAIL"] == 1
    assert epochs_trained == [1, 2]  # epoch 0 came from the checkpoint
    [run] = [run for run in tracker.runs.values() if run.parent_id is not None]
    assert sorted(step for step, _ in run.metrics["val_acc"]) == [1, 2, 3]  # restored epoch logged too
    assert not list(checkpoints.rglob("*.pt"))  # removed once the trial completed


@pytest.mark.slow
def test_a_checkpoint_of_another_configuration_is_discarded_not_resumed(
    tmp_path, shared_cache, smoke_overrides, tiny_teacher_checkpoint, monkeypatch
):
    import kdsearch.search.trial

    storage = f"sqlite:///{tmp_path}/studies.db"
    overrides = {**smoke_overrides, "teacher": {"checkpoint": tiny_teacher_checkpoint}, "train.epochs": 2}
    spec = load_study(SMOKE, {**overrides, "grid.t": [1.0], "grid.alpha": [0.5], "grid.p": [0.5]})
    real_train = kdsearch.search.trial.train
    epochs_trained: list[int] = []

    def train(config, on_epoch, **kwargs):
        def record(epoch, row):
            on_epoch(epoch, row)
            epochs_trained.append(epoch)
            if dying:
                raise RuntimeError("the worker died")

        return real_train(config, on_epoch=record, **kwargs)

    monkeypatch.setattr(kdsearch.search.trial, "train", train)
    checkpoints = tmp_path / "checkpoints"
    handle = open_study(GRID, spec, storage, FAST)
    dying = True
    with pytest.raises(RuntimeError, match="the worker died"):
        run_study(handle, MemoryTracker(), progress=False, checkpoint_root=checkpoints)
    # A worker on the same machine with another cache directory: same point, another TrainConfig.
    dying, epochs_trained[:] = False, []
    handle = open_study(GRID, spec, storage, FAST)  # queues the failed point again
    other = join_study(handle.name, storage, FAST, STUDY_KINDS, {"train.cache_dir": str(tmp_path / "other-cache")})
    summary = run_study(other, MemoryTracker(), progress=False, checkpoint_root=checkpoints)
    assert summary.counts["COMPLETE"] == 1 and epochs_trained == [0, 1]  # from scratch, not a refused resume


def test_the_median_pruner_lets_every_trial_finish_its_first_epoch():
    spec = load_study(SMOKE, {"tpe.startup_trials": 1})
    study = optuna.create_study(direction="maximize", pruner=PRUNERS[Pruner.MEDIAN](spec))
    for _ in range(2):
        trial = study.ask()
        trial.report(60.0, 1)
        trial.report(70.0, 2)
        study.tell(trial, 70.0)
    weak = study.ask()
    weak.report(10.0, 1)  # far below the median, but after the first epoch only
    assert not weak.should_prune()
    weak.report(20.0, 2)
    assert weak.should_prune()


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.parametrize(("epochs", "state"), [(1, "COMPLETE"), (2, "PRUNED")])
def test_a_trial_is_never_pruned_after_its_last_epoch(
    epochs, state, tmp_path, shared_cache, smoke_overrides, tiny_teacher_checkpoint, monkeypatch
):
    monkeypatch.setitem(PRUNERS, Pruner.MEDIAN, lambda spec: _AlwaysPrune())
    overrides = {**smoke_overrides, "teacher": {"checkpoint": tiny_teacher_checkpoint}, "train.epochs": epochs}
    spec = load_study(SMOKE, {**overrides, "tpe.trials": 1, "tpe.pruner": "median"})
    summary = run_study(
        open_study(TPE, spec, f"sqlite:///{tmp_path}/studies.db", FAST), MemoryTracker(), progress=False
    )
    assert summary.counts[state] == 1 and summary.done == 1


def _report_trial(study: optuna.Study, values: list[float]) -> bool:
    """Report one value per epoch; True when the pruner stopped the trial before its last epoch."""
    trial = study.ask()
    for epoch, value in enumerate(values, start=1):
        trial.report(value, epoch)
        if epoch < len(values) and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return True
    study.tell(trial, values[-1])
    return False


def test_the_none_pruner_never_prunes():
    spec = load_study(SMOKE, {"tpe.pruner": "none", "train.epochs": 9})
    study = optuna.create_study(direction="maximize", pruner=PRUNERS[Pruner.NONE](spec))
    for _ in range(4):
        assert not _report_trial(study, [90.0] * 9)
    assert not _report_trial(study, [1.0] * 9)


def test_the_hyperband_pruner_stops_weak_trials_within_the_epoch_budget():
    spec = load_study(SMOKE, {"tpe.pruner": "hyperband", "train.epochs": 9})
    # Hyperband assigns trials to brackets by a hash of the study name: a fixed name, a fixed assignment.
    pruner = PRUNERS[Pruner.HYPERBAND](spec)
    study = optuna.create_study(study_name="hyperband", direction="maximize", pruner=pruner)
    strong = [_report_trial(study, [50.0 + trial + epoch for epoch in range(9)]) for trial in range(12)]
    weak = [_report_trial(study, [1.0] * 9) for _ in range(6)]
    # One of Hyperband's brackets always trains to the full budget; the others stop weak trials early.
    assert not any(strong[:3]) and sum(weak) >= len(weak) // 2
    assert all(max(t.intermediate_values) < 9 for t in study.trials if t.state == TrialState.PRUNED)


# --- a run none of whose trials completed (issue 31) ---------------------------------------------------------

DIVERGED = TrainingDiverged("the training loss became nan at epoch 1")
TOO_SLOW = optuna.TrialPruned("3.10 ms > max_latency_ms 1.0: not trained")


@pytest.mark.parametrize(
    ("outcomes", "none_completed"),
    [
        ([DIVERGED, DIVERGED], "2 failed (trial 1: the training loss became nan at epoch 1)"),
        ([TOO_SLOW, TOO_SLOW], "2 pruned (trial 1: 3.10 ms > max_latency_ms 1.0: not trained)"),
        ([TOO_SLOW, 80.0], None),
    ],
)
def test_a_run_says_how_its_trials_ended_when_none_completed(outcomes, none_completed, tmp_path):
    handle = open_study(GRID, load_study(SMOKE, {"grid.t": [1.0]}), f"sqlite:///{tmp_path}/studies.db", FAST)
    pending = iter(outcomes)

    def objective(trial):
        outcome = next(pending)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    summary = summarize(handle, run_trials(handle, objective, progress=False), None)
    assert summary.ran == 2 and summary.none_completed == none_completed


def test_a_study_command_none_of_whose_trials_completed_exits_1_saying_why(tmp_path, capsys, monkeypatch):
    import kdsearch.search.study

    def none_completed(handle, *args, **kwargs):
        return RunSummary(2, 0, handle.total, handle.counts(), None, None, "2 failed (trial 1: loss nan)")

    monkeypatch.setattr(kdsearch.search.study, "run_study", none_completed)
    code = main(["study", "grid", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "0 of 4 complete (2 run now)" in captured.out
    assert captured.err == "error: none of the 2 trial(s) run now completed: 2 failed (trial 1: loss nan)\n"


@pytest.mark.parametrize(("points", "picked"), [(0.0, 0), (9.9, 0), (10.0, 1), (14.9, 1), (15.0, 3), (30.0, 3)])
def test_the_pick_of_a_front_is_its_fastest_student_within_the_points_given(points, picked):
    space = {"t": optuna.distributions.FloatDistribution(1.0, 8.0)}
    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy_, latency in ((60.0, 2.0), (50.0, 1.0), (40.0, 3.0), (45.0, 0.5)):
        study.add_trial(optuna.trial.create_trial(params={"t": 2.0}, distributions=space, values=[accuracy_, latency]))
    # The front: 60 % at 2 ms, 50 % at 1 ms, 45 % at 0.5 ms (40 % at 3 ms is dominated).
    assert fastest_within(study, points).number == picked
    assert fastest_within(optuna.create_study(directions=["maximize", "minimize"]), 1.0) is None
