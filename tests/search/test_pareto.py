"""Pruned students, deployment latency and the accuracy × latency (Pareto) study of issue 12."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import torch
from optuna.trial import TrialState

import kdsearch.runtime.timing as deploy
from kdsearch.cli.main import main
from kdsearch.config import LatencyConfig, ModelConfig, PruneConfig, replace
from kdsearch.distill.train import train
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model, channel_plan, count_parameters, load_model
from kdsearch.search.pareto import PARETO
from kdsearch.search.study import front
from kdsearch.search.studyfile import load_study
from tests.fakes import SMOKE


@pytest.mark.slow
def test_a_pruned_student_is_rebuilt_from_its_checkpoint_alone(student_config, tmp_path):
    config = replace(student_config, student=replace(student_config.teacher), prune=PruneConfig(ratio=0.5))
    result = train(config, run_dir=tmp_path / "run", progress=False)
    teacher, _ = load_model(student_config.teacher_checkpoint)
    assert result.model_config.channels == channel_plan(result.model)
    assert count_parameters(result.model) < count_parameters(teacher)
    rebuilt, stored = load_model(tmp_path / "run" / "model.pt")  # no teacher, no prune settings
    images = torch.rand(4, 3, 32, 32)
    trained = result.model.eval().to(memory_format=torch.contiguous_format)  # trained channels_last
    rebuilt.eval()
    assert stored == result.model_config and torch.equal(rebuilt(images), trained(images))


def test_a_second_latency_request_for_an_architecture_is_not_timed_again(tmp_path, monkeypatch):
    timings = []
    real = deploy._measure
    monkeypatch.setattr(deploy, "_measure", lambda *args: timings.append(args[1]) or real(*args))
    monkeypatch.setattr(deploy, "BUSY_CORES", float("inf"))  # cache even on this busy test machine
    model = build_model(ModelConfig(arch="tiny_cnn"))
    latency = LatencyConfig(warmup=0, repeats=2)

    def timed(config):
        return deploy.runtime_latency(model, config, "torch", 1, 1, latency, torch.zeros(1), tmp_path)

    first, again = timed(ModelConfig(arch="tiny_cnn")), timed(ModelConfig(arch="tiny_cnn"))
    other = timed(ModelConfig(arch="tiny_cnn", dropout=0.3))  # another architecture key: timed again
    assert timings == ["torch", "torch"] and not first.cached and again.cached and not other.cached
    assert again.latency_ms == first.latency_ms > 0


def test_onnx_latency_metrics_export_and_quantise_each_model_once(tmp_path, monkeypatch):
    calls = []
    for name in ("export_onnx", "quantize_int8"):
        real = getattr(deploy, name)
        monkeypatch.setattr(
            deploy, name, lambda *args, _real=real, _name=name, **kw: calls.append(_name) or _real(*args, **kw)
        )
    model = build_model(ModelConfig(arch="tiny_cnn")).eval()
    latency = LatencyConfig(warmup=0, repeats=1, batch_sizes=(1, 4))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    metrics = deploy.onnx_latency_metrics(
        model, ModelConfig(arch="tiny_cnn"), latency, images, tmp_path, "latency_ms_x"
    )
    assert calls == ["export_onnx", "quantize_int8"]
    timed = {f"latency_ms_x_onnx_{precision}_b{batch}" for precision in ("fp32", "int8") for batch in (1, 4)}
    assert timed <= set(metrics) and all(metrics[key] > 0 for key in timed)
    assert set(metrics) - timed <= {"latency_ms_x_onnx_other_cores"}


def test_latency_onnx_runtimes_are_checked():
    assert LatencyConfig(onnx_runtimes=[]).onnx_runtimes == ()
    with pytest.raises(ConfigError, match="latency onnx_runtimes must be among onnx-fp32, onnx-int8 but got torch"):
        LatencyConfig(onnx_runtimes=["torch"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"pareto.latency": "tensorrt"},
            r"pareto latency runtime must be one of \['torch', 'onnx-fp32', 'onnx-int8'\] but got 'tensorrt'",
        ),
        ({"pareto.prune_ratios": [0.0, 1.0]}, r"prune_ratios must be in \[0, 1\)"),
        ({"pareto.widths": [0.5], "pareto.prune_ratios": [0.5]}, "cannot start from the teacher's weights"),
        ({"pareto.student_drop": [0, 9]}, "would remove all"),
        ({"pareto.max_latency_ms": -1}, "max_latency_ms must be > 0"),
        ({"pareto.importances": ["l2", "hessian"]}, r"pareto importance must be one of .* but got 'hessian'"),
        ({"pareto.recovery": ["kd", "mse"]}, r"pareto recovery must be among \['kd', 'ce'\]"),
        ({"pareto.stage_ratios": [0.0, 1.0]}, r"pareto stage_ratios must be distinct ratios in \[0, 1\)"),
    ],
)
def test_bad_pareto_settings_are_one_line_errors(overrides, message, smoke_overrides):
    with pytest.raises(ConfigError, match=message):
        PARETO.validate(load_study(SMOKE, {**smoke_overrides, **overrides}))


def test_recovery_axes_become_each_trials_config(smoke_overrides):
    from kdsearch.search.pareto import pareto_config, trial_params

    overrides = {"pareto.stage_ratios": [0.0, 0.5], "pareto.importances": ["taylor"], "pareto.recovery": ["ce"]}
    spec = load_study(SMOKE, {**smoke_overrides, **overrides})
    fixed = {"student_drop": 1, "width": 1.0, "stage_ratio_0": 0.0, "stage_ratio_1": 0.5, "stage_ratio_2": 0.5}
    fixed |= {"stage_ratio_3": 0.0, "alpha": 0.5, "importance": "taylor", "recovery": "ce"}
    params = trial_params(optuna.trial.FixedTrial(fixed), spec.pareto, stages=4)
    assert params == fixed  # no prune_ratio axis beside the per-stage one
    config = pareto_config(spec, params)
    # tiny_cnn without its last block has 3 stages: the first three of the teacher's four ratios
    assert config.prune == PruneConfig(stage_ratios=(0.0, 0.5, 0.5), importance="taylor")
    assert config.kd.alpha == 0.0 and config.overlay.p == 0.0 and config.attention.gamma == 0.0
    unpruned = pareto_config(spec, params | {"stage_ratio_1": 0.0, "stage_ratio_2": 0.0, "recovery": "kd"})
    assert not unpruned.prune.active and unpruned.kd.alpha == 0.5


def test_iterative_pruning_and_sparsity_axes_become_each_trials_config(smoke_overrides):
    from kdsearch.search.pareto import pareto_config, trial_params

    overrides = {"train.epochs": 3, "pareto.prune_steps": [1, 2], "pareto.sparsities": [0, 0.001]}
    spec = load_study(SMOKE, {**smoke_overrides, **overrides})
    fixed = {"student_drop": 0, "width": 1.0, "prune_ratio": 0.5, "alpha": 0.5, "prune_steps": 2, "sparsity": 0.001}
    params = trial_params(optuna.trial.FixedTrial(fixed), spec.pareto)
    assert params == fixed
    assert pareto_config(spec, params).prune == PruneConfig(ratio=0.5, steps=2, sparsity=0.001)
    unpruned = pareto_config(spec, params | {"prune_ratio": 0.0})
    assert not unpruned.prune.active and not unpruned.prune.iterative  # nothing to prune: trained as it is


def test_points_that_train_the_same_student_share_a_training_key(smoke_overrides):
    from kdsearch.search.pareto import pareto_config, training_key

    overrides = {"train.epochs": 3, "pareto.prune_steps": [1, 2], "pareto.importances": ["l2", "taylor"]}
    overrides |= {"pareto.recovery": ["kd", "ce"]}
    spec = load_study(SMOKE, {**smoke_overrides, **overrides})
    point = {"student_drop": 0, "width": 1.0, "prune_ratio": 0.0, "alpha": 0.5, "t": 2.0, "recovery": "kd"}
    point |= {"importance": "l2", "prune_steps": 1}

    def key(**changes):
        return training_key(pareto_config(spec, point | changes))

    # unpruned: how a pruned student would be recovered does not reach its training
    assert key() == key(importance="taylor") == key(prune_steps=2)
    # pruned: it does
    assert (
        len({key(prune_ratio=0.5), key(prune_ratio=0.5, importance="taylor"), key(prune_ratio=0.5, prune_steps=2)}) == 3
    )
    # plain cross-entropy has no temperature (nor alpha); with KD both count
    assert key(recovery="ce") == key(recovery="ce", t=4.0, alpha=0.9)
    assert len({key(), key(t=4.0), key(alpha=0.9)}) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"pareto.prune_steps": [1, 3]},
            r"need at least 3 epochs \(one per pruning step, one of sparsity training\) but the candidates train 1",
        ),
        ({"pareto.prune_steps": [2], "pareto.sparsities": [0.01], "train.epochs": 2}, "need at least 3 epochs"),
        ({"pareto.prune_steps": [0, 2]}, r"prune_steps must be distinct integers >= 1 but got \[0, 2\]"),
        ({"pareto.sparsities": [-1.0]}, r"sparsities must be distinct strengths >= 0"),
    ],
)
def test_pruning_axes_that_cannot_run_are_refused(smoke_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study(SMOKE, {**smoke_overrides, **overrides})


@pytest.mark.slow
def test_a_study_searches_taylor_importance_per_stage_ratios_and_the_recovery_loss(tmp_path, shared_cache):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=3", "--set", "pareto.startup_trials=3"]
    args += ["--set", "pareto.stage_ratios=[0.0, 0.5]", "--set", "pareto.importances=[taylor]"]
    args += ["--set", "pareto.recovery=[kd, ce]", "--set", "pareto.prune_steps=[2]", "--set", "train.epochs=2"]
    args += ["--set", "pareto.enqueue=[{student_drop: 0, stage_ratio_0: 0.5, stage_ratio_1: 0.5, recovery: ce}]"]
    assert main(args) == 0
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    first = trials[0]
    assert first.state == TrialState.COMPLETE and first.params["importance"] == "taylor"
    assert first.params["prune_steps"] == 2  # pruned half-way before epoch 1, the rest before epoch 2
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    model, config = load_model(client.download_artifacts(first.user_attrs["run_id"], "model.pt", str(tmp_path)))
    # tiny_cnn's stages of 8 and 16 channels at 0.5: the first kept whole (never below round_to 8), the second halved
    assert channel_plan(model)[:2] == (8, 8) and config.channels == channel_plan(model)


def test_prune_ratio_outside_the_unit_interval_is_refused():
    with pytest.raises(ConfigError, match=r"prune ratio must be in \(0, 1\)"):
        PruneConfig(ratio=1.5)


@pytest.mark.slow
def test_smoke_pareto_study_has_a_front_and_a_report(tmp_path, shared_cache, capsys, monkeypatch):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=3"]
    assert main(args) == 0
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(study.directions) == 2 and len(complete) == 3 and study.best_trials
    assert all(t.values[1] == t.user_attrs["latency_ms"] > 0 for t in complete)
    assert main([*args]) == 0 and len(study.trials) == 3  # resumed: nothing more to run
    capsys.readouterr()
    assert main(["study", "status", "--workdir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {t["trial"] for t in status["front"]} == {t.number for t in study.best_trials}

    import kdsearch.report.front

    timed_together, interleaved = [], kdsearch.report.front.interleaved_latency

    def recorded(exported, runtime, *args, **kwargs):
        timed_together.append((runtime, len(exported)))
        return interleaved(exported, runtime, *args, **kwargs)

    monkeypatch.setattr(kdsearch.report.front, "interleaved_latency", recorded)
    out = tmp_path / "report"
    assert main(["report", "--study", summary.study_name, "--workdir", str(tmp_path), "--out", str(out)]) == 0
    # the teacher and every trained student (a repeated point is its twin's student) in one interleaved timing
    # per runtime: every speed-up and every point of the figure a ratio of timings taken together
    numbers = {trial.number for trial in complete}
    students = [trial for trial in complete if trial.user_attrs.get("same_as_trial") not in numbers]
    assert timed_together == [("onnx-fp32", 1 + len(students))]
    table = (out / "tables" / "pareto_front.csv").read_text().splitlines()
    assert table[0].startswith("student,architecture,params,MFLOPs,onnx-fp32 ms,onnx-fp32 speed-up")
    assert len(table) == 1 + 1 + len(study.best_trials)  # header, teacher, the front
    assert (out / "figures" / "pareto_front.html").exists() and (out / "figures" / "optuna_pareto_front.html").exists()


@pytest.mark.slow
def test_an_architecture_slower_than_the_constraint_is_timed_but_not_trained(tmp_path, shared_cache, capsys):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=2", "--latency", "torch", "--max-latency-ms", "1e-6"]
    # No trial completed: exit code 1, and the one line says the constraint excluded every candidate.
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "2 of 2 finished (2 run now); states pruned 2" in captured.out
    assert re.fullmatch(
        r"error: none of the 2 trial\(s\) run now completed: 2 pruned \(trial 1: [0-9.]+ ms > max_latency_ms 1e-06: "
        r"not trained\)\n",
        captured.err,
    ), captured.err
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all("run_id" not in t.user_attrs and t.user_attrs["latency_ms"] > 1e-6 for t in trials)
    # Reopened, the study is done: its trials were decided (pruned), not lost, so none runs again.
    assert main(args) == 0
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == 2


@pytest.mark.slow
def test_an_enqueued_reference_is_trained_even_when_slower_than_the_constraint(tmp_path, shared_cache):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=2", "--latency", "torch", "--max-latency-ms", "1e-6"]
    args += ["--set", "pareto.enqueue=[{student_drop: 1, prune_ratio: 0.5, alpha: 0.5}]"]
    assert main(args) == 0
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    reference, sampled = study.trials
    assert reference.state == TrialState.COMPLETE and reference.values[1] > 1e-6 and "run_id" in reference.user_attrs
    assert front(study) == []  # trained as the yardstick, but still infeasible: off the front
    assert sampled.state == TrialState.PRUNED and "run_id" not in sampled.user_attrs


@pytest.mark.slow
def test_a_point_proposed_again_reuses_its_trained_student(tmp_path, shared_cache, monkeypatch, capsys):
    import kdsearch.search.trial

    trainings = []
    real_train = kdsearch.search.trial.train

    def counted(config, **kwargs):
        if config.kd.alpha:  # students only: the smoke teacher, trained by its recipe when not cached, has alpha 0
            trainings.append(config.kd.alpha)
        return real_train(config, **kwargs)

    monkeypatch.setattr(kdsearch.search.trial, "train", counted)
    point = {"student_drop": 1, "width": 1.0, "prune_ratio": 0.0, "alpha": 0.5, "importance": "l2"}
    # unpruned, so the importance that would rank its channels does not reach its training: the same student
    other = point | {"importance": "taylor"}
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress", "--latency", "torch"]
    args += [
        "--set",
        "latency.repeats=2",
        "--set",
        "pareto.trials=2",
        "--set",
        "pareto.importances=[l2, taylor]",
        "--set",
        f"pareto.enqueue=[{json.dumps(point)}, {json.dumps(other)}]",
    ]
    assert main(args) == 0
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    first, again = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert (first.params, again.params) == (point, other) and again.user_attrs["same_as_trial"] == 0
    assert again.values == first.values and again.user_attrs["run_id"] == first.user_attrs["run_id"]
    assert trainings == [0.5]
    capsys.readouterr()
    assert main(["study", "status", "--workdir", str(tmp_path)]) == 0
    fronts = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("front:")]
    assert len(fronts) == 2 and fronts[1].endswith("(the student of trial 0)")
    assert not fronts[0].endswith(")")
