"""kdsearch.search.tune: the grid and TPE study kinds (their points, spaces, checks and objectives)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import optuna
import pytest

from kdsearch.errors import ConfigError
from kdsearch.search.studyfile import build_spec
from kdsearch.search.tune import GRID, PRUNERS, TPE, check_selectable

TRAIN = {
    "data": {"dataset": "synthetic", "synthetic_size": 400, "val_size": 100},
    "student": {"arch": "tiny_cnn", "drop_blocks": 1},
    "teacher": {"arch": "tiny_cnn"},
    "epochs": 3,
}


@pytest.fixture
def spec(tiny_teacher_checkpoint, tmp_path):
    """build_spec of a study file over the tiny teacher, with ``sections`` added and ``train`` changes."""

    def make(train: dict | None = None, **sections):
        raw = {"name": "tune", "teacher": {"checkpoint": tiny_teacher_checkpoint}}
        raw["train"] = {**TRAIN, "cache_dir": str(tmp_path / "cache"), **(train or {})}
        return build_spec({**raw, **sections})

    return make


class Runner:
    """Stands in for TrialRunner: records what each trial would train, answers a val_acc."""

    def __init__(self):
        self.calls = []

    def train(self, trial, config, **kwargs):
        self.calls.append((trial.params, config, kwargs))
        return SimpleNamespace(val_acc=10.0 * len(self.calls))


def test_the_kinds_names_and_units():
    assert (GRID.name, GRID.unit, GRID.queue) == ("grid", "grid points", True)
    assert (TPE.name, TPE.unit, TPE.queue) == ("tpe", "TPE trials", False)


# --- grid -------------------------------------------------------------------------------------


def test_grid_points_vary_the_first_axis_slowest(spec):
    grid = spec(grid={"t": [1, 4], "alpha": [0.1, 0.5, 0.9], "p": 0.5})
    space = GRID.space(grid)
    assert space == {"t": [1.0, 4.0], "alpha": [0.1, 0.5, 0.9], "p": [0.5]}
    assert GRID.points(space) == [
        {"t": 1.0, "alpha": 0.1, "p": 0.5},
        {"t": 1.0, "alpha": 0.5, "p": 0.5},
        {"t": 1.0, "alpha": 0.9, "p": 0.5},
        {"t": 4.0, "alpha": 0.1, "p": 0.5},
        {"t": 4.0, "alpha": 0.5, "p": 0.5},
        {"t": 4.0, "alpha": 0.9, "p": 0.5},
    ]
    assert GRID.total(space) == 6
    assert GRID.total({"t": [1, 2], "alpha": [0, 1], "p": [0, 0.5, 1], "gamma": [0, 1]}) == 24


def test_an_axis_the_grid_leaves_out_is_held_at_the_base_value(spec):
    grid = spec(train={"kd": {"alpha": 0.3, "temperature": 2.0}}, grid={"t": [1, 2]})
    assert GRID.space(grid) == {"t": [1.0, 2.0], "alpha": [0.3], "p": [0.1]}  # p: OverlayConfig's default


def test_grid_trial_configs_are_the_base_config_at_each_point(spec):
    grid = spec(grid={"t": [1, 4], "alpha": [0.1], "p": [0.0, 0.5]})
    configs = GRID.trial_configs(grid, GRID.space(grid))
    assert [(c.kd.temperature, c.kd.alpha, c.overlay.p) for c in configs] == [
        (1.0, 0.1, 0.0),
        (1.0, 0.1, 0.5),
        (4.0, 0.1, 0.0),
        (4.0, 0.1, 0.5),
    ]
    assert all(c.data == grid.train.data and c.epochs == 3 for c in configs)


def test_grid_validate(spec):
    GRID.validate(spec(grid={"t": [1, 4], "alpha": [0.1], "p": [0.5]}))
    with pytest.raises(ConfigError, match=re.escape("no grid: give --t, --alpha and --p, or a 'grid' section")):
        GRID.validate(spec())
    with pytest.raises(ConfigError, match=re.escape("train.data.val_size must be > 0")):
        GRID.validate(spec(train={"data": {**TRAIN["data"], "val_size": 0}}, grid={"t": [1]}))


def test_grid_validate_builds_every_points_config(spec):
    # gamma > 0 is refused with cached teacher logits, but only the grid's second gamma value has it.
    cached = {"kd": {"teacher_logits": "cached", "alpha": 0.5}}
    with pytest.raises(ConfigError, match="attention transfer \\(gamma > 0\\) needs the online teacher"):
        GRID.validate(spec(train=cached, grid={"t": [1], "gamma": [0, 0.5]}))
    GRID.validate(spec(train=cached, grid={"t": [1], "gamma": [0]}))


def test_grid_objective_trains_the_enqueued_point(spec):
    grid = spec(grid={"t": [1, 4], "alpha": [0.1, 0.5], "p": [0.5]})
    handle = SimpleNamespace(spec=grid, space=GRID.space(grid))
    runner = Runner()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"t": 4.0, "alpha": 0.1, "p": 0.5})
    study.optimize(GRID.objective(handle, runner), n_trials=1)
    [(params, config, kwargs)] = runner.calls
    assert params == {"t": 4.0, "alpha": 0.1, "p": 0.5} and kwargs == {}
    assert (config.kd.temperature, config.kd.alpha, config.overlay.p) == (4.0, 0.1, 0.5)
    assert study.trials[0].value == 10.0


# --- TPE --------------------------------------------------------------------------------------


def test_tpe_space_and_total(spec):
    tpe = spec(tpe={"trials": 7, "t": {"low": 1, "high": 8, "log": True}, "alpha": [0, 0.5], "pruner": "none"})
    space = TPE.space(tpe)
    assert space == {
        "trials": 7,
        "t": {"low": 1, "high": 8, "log": True},
        "alpha": {"low": 0.0, "high": 0.5, "log": False},
        "p": {"low": 0.0, "high": 0.5, "log": False},
        "lr": None,
        "student_drop": None,
        "pruner": "none",
        "startup_trials": 4,
        "seed": 0,
    }  # no "gamma": as TPE studies stored before the AT axis existed
    assert TPE.total(space) == 7
    with_gamma = TPE.space(spec(tpe={"gamma": [0, 2]}))
    assert with_gamma["gamma"] == {"low": 0.0, "high": 2.0, "log": False}


def test_tpe_validate(spec):
    TPE.validate(spec(tpe={"trials": 2, "student_drop": [0, 3]}))
    with pytest.raises(ConfigError, match=re.escape("no TPE search space: add a 'tpe' section to the study file")):
        TPE.validate(spec(grid={"t": [1]}))
    with pytest.raises(ConfigError, match=re.escape("drop_blocks=4 would remove all 4 feature blocks of tiny_cnn")):
        TPE.validate(spec(tpe={"student_drop": [0, 4]}))
    with pytest.raises(ConfigError, match=re.escape("train.data.val_size must be > 0")):
        TPE.validate(spec(train={"data": {**TRAIN["data"], "val_size": 0}}, tpe={}))


def test_check_selectable(spec):
    check_selectable(spec(tpe={}))
    with pytest.raises(
        ConfigError, match=re.escape("studies select on validation accuracy: train.data.val_size must be > 0")
    ):
        check_selectable(spec(train={"data": {**TRAIN["data"], "val_size": 0}}))


def test_tpe_trial_configs_bound_what_the_trials_need(spec):
    [config] = TPE.trial_configs(spec(tpe={"alpha": [0, 0.7], "p": [0.1, 0.3]}), {})
    assert (config.kd.alpha, config.overlay.p, config.attention.gamma) == (0.7, 0.3, 0.0)
    [config] = TPE.trial_configs(spec(tpe={"gamma": [0, 2]}), {})
    assert config.attention.gamma == 2.0


@pytest.mark.parametrize(
    ("pruner", "kind"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_tpe_algorithms_pick_the_study_files_pruner(spec, pruner, kind):
    tpe = spec(tpe={"pruner": pruner, "startup_trials": 3})
    sampler, chosen = TPE.algorithms(tpe, joining=False)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._constant_liar
    assert sampler._n_startup_trials == 3 and type(chosen) is kind
    assert type(PRUNERS[pruner](tpe)) is kind
    if pruner == "median":  # the first epoch never decides, nor do the startup trials
        assert (chosen._n_startup_trials, chosen._n_warmup_steps) == (3, 2)
    if pruner == "hyperband":
        assert (chosen._min_resource, chosen._max_resource) == (1, 3)  # train.epochs


def _first_points(sampler, n: int = 3) -> list[float]:
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=n)
    return [trial.params["x"] for trial in study.trials]


def test_tpe_seed_is_used_by_the_creator_and_left_unset_by_a_joining_worker(spec):
    tpe = spec(tpe={"seed": 5})
    created = [_first_points(TPE.algorithms(tpe, joining=False)[0]) for _ in range(2)]
    assert created[0] == created[1]
    joined = [_first_points(TPE.algorithms(tpe, joining=True)[0]) for _ in range(2)]
    assert joined[0] != joined[1] and created[0] not in joined


def test_tpe_objective_trains_the_sampled_params_with_pruning(spec):
    tpe = spec(tpe={"alpha": [0.1, 0.9], "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "student_drop": [0, 2]})
    handle = SimpleNamespace(spec=tpe, space=TPE.space(tpe))
    runner = Runner()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(TPE.objective(handle, runner), n_trials=3)
    assert len(runner.calls) == 3
    for trial, (params, config, kwargs) in zip(study.trials, runner.calls, strict=True):
        assert set(params) == {"t", "alpha", "p", "lr", "student_drop"} and kwargs == {"prune": True}
        assert (config.kd.temperature, config.kd.alpha, config.overlay.p) == (params["t"], params["alpha"], params["p"])
        assert config.optim.lr == params["lr"] and config.student.drop_blocks == params["student_drop"]
        assert 0.1 <= params["alpha"] <= 0.9 and params["student_drop"] in (0, 1, 2)
        assert trial.distributions["t"].log and trial.distributions["lr"].log
    assert [trial.value for trial in study.trials] == [10.0, 20.0, 30.0]


STUDENTS = {
    "tiny": {"arch": "tiny_cnn", "drop_blocks": 1},
    "factory": {"arch": "python:tests.models.sample_factory:small_net", "normalization": "none"},
}


def test_a_grid_student_axis_names_the_studys_students_and_each_point_gets_its_own(spec):
    made = spec(students=STUDENTS, grid={"t": [2.0], "alpha": [0.5], "p": [0.0], "student": ["tiny", "factory"]})
    points = GRID.points(GRID.space(made))
    assert points == [
        {"t": 2.0, "alpha": 0.5, "p": 0.0, "student": "tiny"},
        {"t": 2.0, "alpha": 0.5, "p": 0.0, "student": "factory"},
    ]
    configs = GRID.trial_configs(made, GRID.space(made))
    assert [config.student.arch for config in configs] == ["tiny_cnn", "python:tests.models.sample_factory:small_net"]
    assert configs[1].student.normalization == "none" and configs[1].student.num_classes == 10
    GRID.validate(made)  # both students build and give logits


def test_a_named_student_is_built_with_its_builder_args(spec):
    wide = {
        "arch": "python:tests.models.sample_factory:small_net",
        "normalization": "none",
        "builder_args": {"width": 16},
    }
    made = spec(
        students={**STUDENTS, "wide": wide},
        grid={"t": [2.0], "alpha": [0.5], "p": [0.0], "student": ["factory", "wide"]},
    )
    narrow, wider = (config.student for config in GRID.trial_configs(made, GRID.space(made)))
    assert narrow.builder_args is None and wider.builder_args == (("width", 16),)
    GRID.validate(made)  # the factory takes width: both build and give logits
    with pytest.raises(ConfigError, match=r"small_net\(num_classes=10, depth=2\) failed"):
        GRID.validate(spec(students={"deep": {**wide, "builder_args": {"depth": 2}}}, grid={"student": ["deep"]}))


def test_a_student_axis_naming_no_student_of_the_study_is_refused(spec):
    with pytest.raises(
        ConfigError, match=r"grid student 'resnet' is not in the study's students \['factory', 'tiny'\]"
    ):
        spec(students=STUDENTS, grid={"t": [2.0], "alpha": [0.5], "p": [0.0], "student": ["tiny", "resnet"]})
    with pytest.raises(ConfigError, match="students 'bad': arch must be one of"):
        spec(students={"bad": {"arch": "resnet18"}})


def test_a_student_that_cannot_give_logits_is_refused_when_the_grid_is_validated(spec):
    students = {**STUDENTS, "wrong": {"arch": "python:tests.models.sample_factory:wrong_width"}}
    made = spec(students=students, grid={"t": [2.0], "alpha": [0.5], "p": [0.0], "student": ["tiny", "wrong"]})
    with pytest.raises(ConfigError, match=r"returns shape \(2, 11\)"):
        GRID.validate(made)


def test_the_stored_space_of_a_study_without_a_student_axis_is_unchanged(spec):
    tpe = TPE.space(spec(tpe={"trials": 3}))
    assert "student" not in tpe and "student" not in GRID.space(spec(grid={"t": [1.0], "alpha": [0.5], "p": [0.0]}))
    with_axis = TPE.space(spec(students=STUDENTS, tpe={"trials": 3, "student": ["tiny", "factory"]}))
    assert with_axis["student"] == ["tiny", "factory"]


@pytest.mark.slow
def test_a_grid_over_two_students_trains_each_and_logs_its_architecture(spec, tmp_path):
    from mlflow import MlflowClient

    from kdsearch.search.launch import Workspace

    made = spec(
        students=STUDENTS,
        grid={"t": [2.0], "alpha": [0.5], "p": [0.0], "student": ["tiny", "factory"]},
        train={"epochs": 1, "batch_size": 50},
        latency={"repeats": 1, "warmup": 0, "batch_sizes": [1], "onnx_runtimes": []},
    )
    workspace = Workspace(tmp_path / "ws")
    summary = workspace.run("grid", made, study_name="students", progress=False)
    assert (summary.done, summary.total) == (2, 2)
    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`kdsearch.role` = 'child'")
    assert sorted(run.data.params["student.arch"] for run in runs) == [
        "python:tests.models.sample_factory:small_net",
        "tiny_cnn",
    ]


def test_a_pareto_student_axis_replaces_the_built_in_architecture_axes(spec):
    from kdsearch.search.pareto import PARETO, pareto_config, trial_params

    made = spec(students=STUDENTS, pareto={"trials": 2, "students": ["tiny", "factory"]})
    params = trial_params(optuna.trial.FixedTrial({"student": "factory"}), made.pareto)
    assert params == {"student": "factory"}  # no student_drop, width or prune_ratio drawn
    config = pareto_config(made, params)
    assert config.student.arch == "python:tests.models.sample_factory:small_net" and not config.prune.active
    PARETO.validate(made)


def test_the_overlay_method_is_a_categorical_axis_of_grid_and_tpe(spec):
    made = spec(grid={"t": [2.0], "alpha": [0.5], "p": [0.5], "method": ["integrated_gradients", "saliency"]})
    configs = GRID.trial_configs(made, GRID.space(made))
    assert [config.overlay.method for config in configs] == ["integrated_gradients", "saliency"]
    tpe = spec(tpe={"trials": 3, "method": ["saliency", "grad_cam"]})
    assert TPE.space(tpe)["method"] == ["saliency", "grad_cam"]
    # Every method on the axis has a prepared config, so its maps are computed once before the trials.
    assert {config.overlay.method for config in TPE.trial_configs(tpe, TPE.space(tpe))} == {"saliency", "grad_cam"}
    params = {"t": 2.0, "alpha": 0.5, "p": 0.5, "method": "grad_cam"}
    assert tpe.configure(params).overlay.method == "grad_cam"
    with pytest.raises(ConfigError, match="grid method must be one of"):
        spec(grid={"t": [2.0], "alpha": [0.5], "p": [0.5], "method": ["lime"]})
