from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdsearch.track.tracking import PARENT_KEY_TAG, MemoryTracker, MlflowTracker, TrackingError, run_tags


def test_memory_tracker_finds_the_parent_again():
    tracker = MemoryTracker()
    parent = tracker.parent_run("exp", "study-a", "study-a", {"x": "1"})
    assert tracker.parent_run("exp", "study-a", "study-a", {}) == parent
    assert tracker.parent_run("other-exp", "study-a", "study-a", {}) != parent
    child = tracker.start_run("exp", "trial-0", parent, {})
    tracker.log_params(child, {"kd.alpha": 0.1})
    tracker.log_metrics(child, {"val_acc": 10.0}, step=1)
    tracker.log_metrics(child, {"val_acc": 12.0}, step=2)
    tracker.end_run(child)
    [run] = tracker.children(parent)
    assert run.params == {"kd.alpha": 0.1} and run.metrics["val_acc"] == [(1, 10.0), (2, 12.0)]
    assert run.latest("val_acc") == 12.0 and run.status == "FINISHED"


def test_mlflow_tracker_nests_runs_under_one_parent(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    tracker = MlflowTracker(mlflow_uri)
    tracker.check()
    parent = tracker.parent_run("exp", "study-a", "study-a", {"git_commit": "abc"})
    assert MlflowTracker(mlflow_uri).parent_run("exp", "study-a", "study-a", {}) == parent  # another process
    child = tracker.start_run("exp", "trial-0", parent, {"device": "cpu"})
    tracker.log_params(child, {f"p{i}": i for i in range(150)})  # more than one MLflow batch
    tracker.log_metrics(child, {"val_acc": 50.0, "train_loss": 1.0}, step=1)
    tracker.log_dict(child, {"epochs": 1}, "config.json")
    (tmp_path / "model.pt").write_bytes(b"weights")
    tracker.log_artifact(child, tmp_path / "model.pt")
    tracker.end_run(child)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["p149"] == "149" and run.data.metrics["val_acc"] == 50.0
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(child)} == {"config.json", "model.pt"}
    assert client.get_run(parent).data.tags[PARENT_KEY_TAG] == "study-a"
    # Artifacts of the default local store sit beside its database, not in the working directory.
    assert (tmp_path / "mlruns" / "artifacts" / "exp").is_dir()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite:////nonexistent-dir/sub/mlflow.db", "does not exist"),
        ("http://127.0.0.1:9/", "cannot reach the MLflow server"),
        ("file:///tmp/mlruns", "refuses the file store"),
        ("postgresql://nobody@127.0.0.1:9/db", "cannot reach tracking store"),
        ("foo://bar", "foo://bar: not a tracking URI kdsearch can use"),
    ],
)
def test_check_rejects_unusable_stores_without_writing(uri, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingError, match=message):
        MlflowTracker(uri).check()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a database", b"SQLite format 3\x00" + b"\x00" * 200])
def test_check_rejects_a_local_store_that_is_not_a_sound_sqlite_file(content, tmp_path):
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(content)
    with pytest.raises(TrackingError, match=rf"{store}: .* \(not a sound SQLite database file\)$"):
        MlflowTracker(f"sqlite:///{store}").check()
    assert store.read_bytes() == content and list(store.parent.iterdir()) == [store]


def test_check_accepts_a_new_local_store_and_writes_nothing(tmp_path):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    tracker.check()
    assert not (tmp_path / "mlruns").exists()


def test_run_tags_say_where_and_with_what():
    tags = run_tags(torch.device("cpu"))
    assert tags["torch_version"] == torch.__version__
    assert tags["device"].startswith("cpu:") and "threads" in tags["device"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    assert len(head) == 40 and tags["git_commit"] == head + ("+dirty" if changes else "")


@pytest.mark.slow
def test_workers_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    # Each process opens the same new store and creates a parent run; without a lock around MLflow's
    # schema migration, one of several simultaneous first users fails.
    script = (
        "import sys, time\n"
        "from kdsearch.track.tracking import MlflowTracker\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "tracker = MlflowTracker(sys.argv[1])\n"
        "print(tracker.parent_run('race', 'study', 'study', {}))\n"
    )
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    start = f"{time.time() + 3:.3f}"  # after every interpreter has started
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [process.communicate(timeout=180) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err[-500:] for _, err in results]
    assert all(out.strip() for out, _ in results)  # each got a parent run id


@pytest.mark.parametrize("backend", ["memory", "mlflow"])
def test_running_children_are_the_parents_open_runs_with_the_tag(backend, mlflow_uri):
    tracker = MemoryTracker() if backend == "memory" else MlflowTracker(mlflow_uri)
    parent = tracker.parent_run("exp", "study", "study", {})
    other_parent = tracker.parent_run("exp", "other", "other", {})
    runs = {number: tracker.start_run("exp", f"trial-{number}", parent, {"optuna.trial": number}) for number in "0123"}
    tracker.start_run("exp", "trial-1", other_parent, {"optuna.trial": "1"})  # another study's trial 1
    tracker.end_run(runs["2"], "FAILED")
    assert sorted(tracker.running_children(parent, "optuna.trial", ["1", "2", "3"])) == sorted([runs["1"], runs["3"]])
    assert tracker.running_children(parent, "optuna.trial", ["7"]) == []
