from __future__ import annotations

import math

import optuna
import pytest
import torch
from scipy import stats

from kdsearch.cli.main import main
from kdsearch.config import IGConfig, ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.models.classifiers import build_model
from kdsearch.search.ablation import (
    ARMS,
    ablation_table,
    agreement_index,
    arm_config,
    explanation_agreement,
    ig_on,
)
from kdsearch.search.studyfile import load_study
from tests.fakes import SMOKE


def test_arms_differ_only_in_alpha_p_gamma_and_alignment():
    extra = ["ig_shuffled", "at", "ig_at", "kd_at", "kd_ig_at"]
    spec = load_study(SMOKE, {"ablation.extra_arms": extra, "ablation.gamma": 0.3})
    configs = {arm: arm_config(spec, arm, 7) for arm in spec.ablation.all_arms}
    terms = {arm: (c.kd.alpha, c.overlay.p, c.overlay.mode, c.attention.gamma) for arm, c in configs.items()}
    assert terms == {
        "baseline": (0.0, 0.0, "aligned", 0.0),
        "kd": (0.5, 0.0, "aligned", 0.0),
        "ig": (0.0, 0.5, "aligned", 0.0),
        "kd_ig": (0.5, 0.5, "aligned", 0.0),
        "ig_shuffled": (0.5, 0.5, "shuffled", 0.0),
        "at": (0.0, 0.0, "aligned", 0.3),
        "ig_at": (0.0, 0.5, "aligned", 0.3),
        "kd_at": (0.5, 0.0, "aligned", 0.3),
        "kd_ig_at": (0.5, 0.5, "aligned", 0.3),
    }
    assert {c.seed for c in configs.values()} == {7}
    assert len({(c.data, c.student, c.epochs, c.optim, c.kd.temperature) for c in configs.values()}) == 1
    assert set(ARMS) == set(terms)


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


def test_student_ig_maps_have_the_cache_shape():
    splits = load_splits(load_study(SMOKE).train.data)
    model = build_model(ModelConfig(arch="tiny_cnn", drop_blocks=1))
    maps = ig_on(model, splits.test_images[:6], splits.test_labels[:6], splits, IGConfig(n_steps=4, images_per_call=4))
    assert maps.shape == (6, 32, 32) and (maps >= 0).all()


def _fake_ablation(results: dict[str, list[float]]) -> optuna.Study:
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
                    user_attrs={"test_acc": accuracy, "agreement_spearman": 0.5, "agreement_iou_top10": 0.25},
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
