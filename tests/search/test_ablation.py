from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
from scipy import stats

from kdsearch.cli.main import main
from kdsearch.config import AttributionMethod, IGConfig, ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import Attribution, maps_on
from kdsearch.errors import StudyError
from kdsearch.models.classifiers import build_model
from kdsearch.search.ablation import (
    ABLATION,
    ARMS,
    ablation_table,
    agreement_index,
    arm_choices,
    arm_config,
    explanation_agreement,
)
from kdsearch.search.studyfile import load_study
from tests.fakes import SMOKE


def test_arms_differ_only_in_alpha_p_gamma_alignment_and_maps():
    extra = ["ig_shuffled", "at", "ig_at", "kd_at", "kd_ig_at"]
    methods = [m.value for m in AttributionMethod if m != "integrated_gradients"]
    extra += [f"kd_{m}" for m in methods] + [f"{m}_shuffled" for m in methods]
    spec = load_study(SMOKE, {"ablation.extra_arms": extra, "ablation.gamma": 0.3})
    configs = {arm: arm_config(spec, arm, 7) for arm in spec.ablation.all_arms}
    terms = {
        arm: (c.kd.alpha, c.overlay.p, c.overlay.mode, c.attention.gamma, c.overlay.method)
        for arm, c in configs.items()
    }
    ig = "integrated_gradients"
    assert terms == {
        "baseline": (0.0, 0.0, "aligned", 0.0, ig),
        "kd": (0.5, 0.0, "aligned", 0.0, ig),
        "ig": (0.0, 0.5, "aligned", 0.0, ig),
        "kd_ig": (0.5, 0.5, "aligned", 0.0, ig),
        "ig_shuffled": (0.5, 0.5, "shuffled", 0.0, ig),
        "at": (0.0, 0.0, "aligned", 0.3, ig),
        "ig_at": (0.0, 0.5, "aligned", 0.3, ig),
        "kd_at": (0.5, 0.0, "aligned", 0.3, ig),
        "kd_ig_at": (0.5, 0.5, "aligned", 0.3, ig),
        **{f"kd_{m}": (0.5, 0.5, "aligned", 0.0, m) for m in methods},
        **{f"{m}_shuffled": (0.5, 0.5, "shuffled", 0.0, m) for m in methods},
    }
    assert {c.seed for c in configs.values()} == {7}
    assert len({(c.data, c.student, c.epochs, c.optim, c.kd.temperature, c.attribution) for c in configs.values()}) == 1
    assert set(ARMS) == set(terms)


def test_the_arms_without_other_methods_keep_their_config_keys():
    from kdsearch.config import to_dict

    spec = load_study(SMOKE)
    for arm in ("baseline", "kd", "ig", "kd_ig"):
        stored = to_dict(arm_config(spec, arm, 0))
        assert "attribution" not in stored and "method" not in stored["overlay"], arm


def test_an_ablation_space_is_stored_as_before_unless_it_measures_agreement_by_another_method():
    assert "agreement_method" not in ABLATION.space(load_study(SMOKE))
    other = ABLATION.space(load_study(SMOKE, {"ablation.agreement_method": "saliency"}))
    assert other["agreement_method"] == "saliency"


def test_a_stored_ablation_keeps_its_arm_choices_and_refuses_arms_it_cannot_hold():
    old_arms = ["baseline", "kd", "ig", "kd_ig", "ig_shuffled"]  # the arms of a study made before the others
    study = optuna.create_study(direction="maximize", study_name="old")
    assert arm_choices(study) == [str(arm) for arm in ARMS]
    distributions = {"arm": optuna.distributions.CategoricalDistribution(old_arms)}
    study.add_trial(optuna.trial.create_trial(params={"arm": "kd"}, distributions=distributions, value=1.0))
    assert arm_choices(study) == old_arms
    study.enqueue_trial({"arm": "kd_ig"})
    study.optimize(lambda trial: float(len(trial.suggest_categorical("arm", arm_choices(trial.study)))), n_trials=1)
    assert study.trials[-1].params == {"arm": "kd_ig"}  # Optuna would refuse any other list of choices
    ABLATION.check_grown(study, {"arms": old_arms})
    with pytest.raises(StudyError, match=r"created before the arms \['kd_saliency'\] existed"):
        ABLATION.check_grown(study, {"arms": [*old_arms, "kd_saliency"]})


def test_agreement_of_identical_reversed_and_disjoint_maps():
    maps = torch.rand(5, 8, 8)
    same = explanation_agreement(maps, maps.clone())
    assert same["agreement_spearman"] == pytest.approx(1.0) and same["agreement_iou_top10"] == pytest.approx(1.0)
    assert explanation_agreement(maps, -maps)["agreement_spearman"] == pytest.approx(-1.0)
    ramp = torch.arange(100.0).view(1, 10, 10)
    disjoint = explanation_agreement(ramp, -ramp)
    assert disjoint["agreement_iou_top10"] == 0.0


def test_agreement_spearman_matches_scipy_with_ties():
    a = torch.tensor([[0.0, 0.0, 1.0, 3.0, 2.0, 5.0]])
    b = torch.tensor([[0.0, 1.0, 1.0, 2.0, 4.0, 4.0]])
    expected = stats.spearmanr(a[0].numpy(), b[0].numpy()).statistic
    assert explanation_agreement(a, b)["agreement_spearman"] == pytest.approx(expected)


def test_agreement_images_are_a_fixed_sample():
    first = agreement_index(1000, 50)
    assert torch.equal(first, agreement_index(1000, 50)) and len(set(first.tolist())) == 50
    assert len(agreement_index(30, 50)) == 30


@pytest.mark.parametrize("method", ["integrated_gradients", "grad_cam"])
def test_student_maps_have_the_cache_shape(method):
    splits = load_splits(load_study(SMOKE).train.data)
    model = build_model(ModelConfig(arch="tiny_cnn", drop_blocks=1))
    attribution = Attribution(method, IGConfig(n_steps=4, images_per_call=4))
    maps = maps_on(model, splits.test_images[:6], splits.test_labels[:6], splits, attribution)
    assert maps.shape == (6, 32, 32) and (maps >= 0).all()


def _fake_ablation(results: dict[str, list[float]], map_ms: dict[str, float] | None = None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    arms = list(results)
    seeds = list(range(len(next(iter(results.values())))))
    space = {"arms": arms, "seeds": seeds, "t": 2.5, "alpha": 0.01, "p": 0.1}
    study.set_user_attr("kdsearch", {"kind": "ablation", "space": space})
    study.set_user_attr("teacher_test_acc", 93.91)
    distributions = {
        "arm": optuna.distributions.CategoricalDistribution(arms),
        "seed": optuna.distributions.CategoricalDistribution(seeds),
    }
    for arm, accuracies in results.items():
        for seed, accuracy in enumerate(accuracies):
            study.add_trial(
                optuna.trial.create_trial(
                    params={"arm": arm, "seed": seed},
                    distributions=distributions,
                    value=accuracy,
                    user_attrs={
                        "test_acc": accuracy,
                        "agreement_spearman": 0.5,
                        "agreement_iou_top10": 0.25,
                        **({"map_ms": map_ms[arm]} if arm in (map_ms or {}) else {}),
                    },
                )
            )
    return study


def test_table3_statistics_are_paired_over_seeds():
    results = {
        "baseline": [91.4, 91.5, 91.3],
        "kd": [92.3, 92.2, 92.4],
        "ig": [92.0, 92.1, 91.9],
        "kd_ig": [92.5, 92.4, 92.6],
        "ig_shuffled": [91.6, 91.8, 91.5],
    }
    table = ablation_table(_fake_ablation(results))
    assert table.teacher_test_acc == 93.91
    assert [row.arm for row in table.rows] == list(results)
    kd = next(row for row in table.rows if row.arm == "kd")
    assert kd.n == 3 and kd.mean == pytest.approx(92.3) and kd.std == pytest.approx(0.1)
    assert kd.delta == pytest.approx(0.9)
    assert kd.p_value == pytest.approx(stats.ttest_rel(results["kd"], results["baseline"]).pvalue)
    low, high = stats.t.interval(0.95, 2, loc=92.3, scale=0.1 / math.sqrt(3))
    assert kd.ci == pytest.approx((low, high))
    assert kd.spearman == 0.5 and kd.iou == 0.25
    pairs = [(c.arm, c.reference) for c in table.comparisons]
    assert pairs == [
        ("kd", "baseline"),
        ("ig", "baseline"),
        ("kd_ig", "baseline"),
        ("ig_shuffled", "baseline"),
        ("kd_ig", "kd"),
        ("kd_ig", "ig_shuffled"),
    ]
    versus_kd = table.comparisons[4]
    assert versus_kd.delta == pytest.approx(0.2) and versus_kd.ci[0] < 0.2 < versus_kd.ci[1]
    text = table.format()
    assert "teacher" in text and "93.91" in text and "kd_ig vs ig_shuffled" in text
    assert "92.30 ± 0.10" in text


def test_the_at_arms_are_compared_with_and_without_the_ig_overlay():
    results = {
        "baseline": [82.3, 82.5, 82.2],
        "at": [83.2, 83.1, 83.2],
        "kd_at": [83.3, 83.2, 83.2],
        "ig_at": [83.1, 83.2, 83.0],
        "kd_ig_at": [83.2, 83.1, 83.3],
    }
    table = ablation_table(_fake_ablation(results))
    extra = {(c.arm, c.reference): c for c in table.comparisons if c.reference != "baseline"}
    assert list(extra) == [("ig_at", "at"), ("kd_ig_at", "kd_at")]  # kd and kd_ig did not run
    assert extra[("ig_at", "at")].n == 3 and extra[("ig_at", "at")].delta == pytest.approx(-0.2 / 3)
    assert extra[("kd_ig_at", "kd_at")].delta == pytest.approx(-0.1 / 3)
    assert "ig_at vs at" in table.format()


def test_each_methods_arm_is_compared_with_the_baseline_kd_and_its_shuffled_control():
    results = {
        "baseline": [90.0, 90.4, 90.2],
        "kd": [90.5, 90.6, 90.7],
        "kd_ig": [90.3, 90.6, 90.4],
        "kd_saliency": [90.9, 91.1, 91.3],
        "saliency_shuffled": [90.4, 90.7, 90.6],
        "kd_grad_cam": [90.6, 90.5, 90.9],
    }
    map_ms = {"kd_ig": 40.0, "kd_saliency": 2.0, "saliency_shuffled": 2.0, "kd_grad_cam": 1.0}
    table = ablation_table(_fake_ablation(results, map_ms))
    rows = {row.arm: row for row in table.methods}
    assert list(rows) == ["kd_ig", "kd_saliency", "kd_grad_cam"]  # the control and the arms without maps are not
    saliency = rows["kd_saliency"]
    assert saliency.method == "saliency" and saliency.map_ms == 2.0 and saliency.n == 3
    assert saliency.vs_kd.delta == pytest.approx(0.5) and saliency.vs_baseline.delta == pytest.approx(0.9)
    assert saliency.vs_shuffled.reference == "saliency_shuffled" and saliency.vs_shuffled.delta == pytest.approx(
        1.6 / 3
    )
    low, high = stats.ttest_1samp(np.subtract(results["kd_saliency"], results["kd"]), 0).confidence_interval(0.95)
    assert saliency.vs_kd.ci == pytest.approx((low, high))
    assert rows["kd_grad_cam"].vs_shuffled is None and rows["kd_ig"].map_ms == 40.0
    assert math.isnan(next(row for row in table.rows if row.arm == "kd").map_ms)
    text = table.format()
    assert "kd_saliency vs saliency_shuffled" in text and "Attribution methods" in text


def test_table_with_one_seed_has_no_spread_and_no_p_values():
    table = ablation_table(_fake_ablation({"baseline": [90.0], "kd": [91.0]}))
    kd = table.rows[1]
    assert kd.delta == 1.0 and math.isnan(kd.std) and math.isnan(kd.p_value)
    assert "n/a" in table.format()


@pytest.mark.slow
def test_smoke_ablation_runs_arms_times_seeds_and_resumes(tmp_path, mlflow_uri, shared_cache, capsys):
    from mlflow import MlflowClient

    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["ablate", "--study", str(SMOKE), "--seeds", "2", "--extra-arms", "ig_shuffled"]
    args += ["--agreement-images", "20", "--storage", storage, "--tracking-uri", mlflow_uri]
    args += ["--set", "latency.repeats=1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 of 10 arm × seed runs already complete; 10 to run" in out
    lines = out.splitlines()
    for arm in ("teacher", "baseline", "kd", "ig", "kd_ig", "ig_shuffled"):
        assert any(line.startswith(arm + " ") for line in lines), arm
    assert "kd_ig vs kd" in out and "kd_ig vs ig_shuffled" in out

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kdsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"{arm}-seed{seed}" for arm in ("baseline", "kd", "ig", "kd_ig", "ig_shuffled") for seed in (0, 1)
    )
    for run in children:
        assert -1 <= run.data.metrics["agreement_spearman"] <= 1
        assert 0 <= run.data.metrics["agreement_iou_top10"] <= 1
        assert run.data.params["arm"] in run.info.run_name
    baseline = next(r for r in children if r.info.run_name == "baseline-seed0")
    assert baseline.data.params["kd.alpha"] == "0.0" and baseline.data.params["overlay.p"] == "0.0"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"table3.txt", "table3.json"}

    assert main(args) == 0
    assert "10 of 10 arm × seed runs already complete; nothing to run" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id])) == 11


@pytest.mark.slow
def test_ablate_from_a_study_takes_its_best_point(tmp_path, mlflow_uri, shared_cache, capsys):
    storage = f"sqlite:///{tmp_path}/studies.db"
    common = ["--storage", storage, "--tracking-uri", mlflow_uri, "--set", "latency.repeats=1", "--no-progress"]
    grid = ["study", "grid", "--study", str(SMOKE), "--t", "3", "--alpha", "0.2", "--p", "0.4", "--study-name", "g"]
    assert main([*grid, *common]) == 0
    ablate = ["ablate", "--study", str(SMOKE), "--seeds", "1", "--arms", "baseline,kd", "--agreement-images", "0"]
    assert main([*ablate, "--from-study", "g", *common]) == 0
    assert "T=3.0, alpha=0.2, p=0.4" in capsys.readouterr().out
    assert main([*ablate, "--from-study", "g", "--t", "2", *common]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_grows_with_more_seeds_and_arms_and_keeps_finished_runs(tmp_path, mlflow_uri, shared_cache, capsys):
    from mlflow import MlflowClient

    common = ["--study", str(SMOKE), "--agreement-images", "0", "--storage", f"sqlite:///{tmp_path}/studies.db"]
    common += ["--tracking-uri", mlflow_uri, "--set", "latency.repeats=1", "--no-progress", "--study-name", "grow"]
    assert main(["ablate", "--seeds", "1", "--arms", "baseline", *common]) == 0
    assert "0 of 1 arm × seed runs already complete; 1 to run" in capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("smoke")
    [first] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "baseline-seed0"]

    assert main(["ablate", "--seeds", "2", "--arms", "baseline,kd", *common]) == 0
    out = capsys.readouterr().out
    assert "1 of 4 arm × seed runs already complete; 3 to run" in out
    assert any(line.startswith("kd ") and " 2 " in line for line in out.splitlines())
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("kdsearch.role") != "parent")
    assert names == ["baseline-seed0", "baseline-seed1", "kd-seed0", "kd-seed1"]
    assert first.info.run_id in {r.info.run_id for r in runs}

    # Asking for fewer members later keeps the union; changing what a run computes is still refused.
    assert main(["ablate", "--seeds", "1", "--arms", "baseline", *common]) == 0
    assert "4 of 4 arm × seed runs already complete; nothing to run" in capsys.readouterr().out
    assert main(["ablate", "--seeds", "1", "--arms", "baseline", "--t", "3", *common]) == 2
    assert "already exists with a different spec or space" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_ablation_of_three_attribution_methods(tmp_path, mlflow_uri, shared_cache, capsys):
    from mlflow import MlflowClient

    from kdsearch.search.study import find_study

    storage = f"sqlite:///{tmp_path}/studies.db"
    arms = "baseline,kd,kd_ig,kd_saliency,kd_grad_cam"
    args = ["ablate", "--study", str(SMOKE), "--seeds", "1", "--arms", arms, "--extra-arms", "grad_cam_shuffled"]
    args += ["--agreement-images", "10", "--agreement-method", "grad_cam", "--storage", storage]
    args += ["--tracking-uri", mlflow_uri, "--set", "latency.repeats=1", "--set", "train.ig.n_steps=4", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 of 6 arm × seed runs already complete; 6 to run" in out
    assert "kd_saliency vs kd" in out and "kd_grad_cam vs grad_cam_shuffled" in out and "Attribution methods" in out

    table = ablation_table(find_study(storage, None))
    methods = {row.arm: row for row in table.methods}
    assert {arm: row.method for arm, row in methods.items()} == {
        "kd_ig": "integrated_gradients",
        "kd_saliency": "saliency",
        "kd_grad_cam": "grad_cam",
    }
    assert all(row.map_ms > 0 and row.vs_kd.n == 1 for row in methods.values())
    assert methods["kd_grad_cam"].vs_shuffled.reference == "grad_cam_shuffled"

    client = MlflowClient(mlflow_uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])}
    saliency = runs["kd_saliency-seed0"].data
    assert saliency.params["overlay.method"] == "saliency" and saliency.params["ig_cache_key"] == "none"
    assert saliency.params["attribution_cache_key"] != runs["kd_grad_cam-seed0"].data.params["attribution_cache_key"]
    assert runs["kd_ig-seed0"].data.params["ig_cache_key"] not in ("none", saliency.params["attribution_cache_key"])
    assert "map_ms" not in runs["kd-seed0"].data.metrics and saliency.metrics["map_ms"] > 0
    for name in ("baseline-seed0", "kd_saliency-seed0"):  # students explained by GradCAM at their own last stage
        assert -1 <= runs[name].data.metrics["agreement_spearman"] <= 1

    report = tmp_path / "report"
    name = find_study(storage, None).study_name
    args = ["report", "--ablation", name, "--out", str(report), "--storage", storage, "--tracking-uri", mlflow_uri]
    assert main([*args, "--no-log"]) == 0
    methods = (report / "tables" / "ablation_methods.md").read_text()
    assert all(
        f"| {arm} | {method} |" in methods
        for arm, method in [("kd_saliency", "saliency"), ("kd_ig", "integrated_gradients")]
    )
    figure = (report / "figures" / "attribution_methods.html").read_text()
    assert all(f'"name":"{row}: ' in figure for row in ("original", "integrated_gradients", "saliency", "grad_cam"))
