"""Workspace: a study of any kind run from Python as the CLI runs it, in a folder of its own by default."""

from __future__ import annotations

import re

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.errors import ConfigError, NotWritable
from kdsearch.search.launch import Workspace
from kdsearch.search.studyfile import load_study
from tests.fakes import SMOKE


@pytest.mark.slow
def test_a_grid_runs_in_the_workspace_folder_and_a_second_run_resumes_with_nothing_left(
    tmp_path, shared_cache, smoke_overrides
):
    import kdsearch

    workspace = kdsearch.Workspace(tmp_path / "ws")
    spec = kdsearch.load_study(SMOKE, smoke_overrides)
    summary = workspace.run("grid", spec, study_name="py-grid", progress=False)
    points = len(spec.grid.t) * len(spec.grid.alpha) * len(spec.grid.p)
    assert (summary.ran, summary.done, summary.total) == (points, points, points)
    assert (tmp_path / "ws" / "studies.db").is_file() and (tmp_path / "ws" / "mlruns" / "mlflow.db").is_file()
    stored = optuna.load_study(study_name="py-grid", storage=workspace.storage_url)
    complete = stored.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == points and summary.best.number == max(complete, key=lambda t: t.value).number
    again = workspace.run("grid", spec, study_name="py-grid", progress=False)
    assert (again.ran, again.done) == (0, points)


def test_an_unknown_kind_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"study kind must be one of \['ablation', 'grid', 'pareto', 'tpe'\]"):
        Workspace(tmp_path / "ws").open("random", load_study(SMOKE))
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("workdir", ["afile", "afile/sub"])
def test_a_workdir_that_is_or_is_under_a_file_is_refused(tmp_path, workdir):
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotWritable, match="afile is a file, not a folder"):
        Workspace(tmp_path / workdir).stores()
    with pytest.raises(NotWritable, match="afile is a file, not a folder"):
        Workspace(tmp_path / workdir).open("grid", load_study(SMOKE))
    assert (tmp_path / "afile").read_text() == ""


@pytest.mark.parametrize(
    ("overrides", "experiment", "message"),
    [
        ({"train.data.val_size": 0}, None, "train.data.val_size must be > 0"),  # found by the grid's validation
        ({}, "x" * 201, "--experiment 'xxxxxxxxxxxxxxxxxxxxxxxx'... is 201 bytes long; at most 200"),
    ],
)
def test_a_study_refused_after_the_workdir_was_named_leaves_no_folder(tmp_path, overrides, experiment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Workspace(tmp_path / "new" / "ws").open("grid", load_study(SMOKE, overrides), experiment=experiment)
    assert not (tmp_path / "new").exists()
