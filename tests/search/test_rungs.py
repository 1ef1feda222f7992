"""Multi-fidelity Pareto search: promotion by non-dominated rank, and rungs in a real (tiny) study."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdsearch.cli.main import main
from kdsearch.errors import ConfigError
from kdsearch.search.rungs import (
    committed_epochs,
    crowding_distances,
    nondominated_ranks,
    promotable,
    promotion_order,
)
from kdsearch.search.studyfile import ParetoSpec
from tests.fakes import SMOKE

# (validation accuracy %, latency ms): A and B are non-dominated, C is dominated by A, D by everything.
A, B, C, D = (80.0, 2.0), (70.0, 1.0), (75.0, 2.5), (60.0, 3.0)


def test_fronts_are_ranked_by_domination():
    assert nondominated_ranks([A, B, C, D]) == [0, 0, 1, 2]
    assert nondominated_ranks([A, A]) == [0, 0]  # equal points do not dominate each other


def test_crowding_gives_the_ends_infinity_and_the_middle_its_normalised_gaps():
    middle = (75.0, 1.5)
    assert crowding_distances([B, middle, A]) == [math.inf, pytest.approx(1.0 + 1.0), math.inf]


def test_promotion_order_is_front_then_crowding():
    # Front 0 is A, middle, B (A and B at the ends, infinitely crowded-apart), then C, then D.
    middle = (75.0, 1.5)
    order = promotion_order([middle, C, A, D, B])
    assert order[:3] in ([2, 4, 0], [4, 2, 0]) and order[3:] == [1, 3]


def test_only_the_best_fraction_is_promoted_and_the_best_alone_while_the_rung_is_young():
    assert promotable(A, [], 3)  # alone: the best
    assert not promotable(C, [A], 3)  # two at the rung, fewer than 3: only the best goes on
    assert promotable(B, [A], 3)  # A and B: one front, both at an end; a tie, which the candidate wins
    others = [(50.0 + i, 5.0) for i in range(5)]  # six at the rung: the best 6 // 3 = 2 go on
    assert promotable((90.0, 1.0), others, 3) and not promotable((50.5, 5.0), others, 3)


@pytest.mark.parametrize(
    ("state", "reached", "stopped_at", "trained", "reference", "epochs"),
    [
        ("COMPLETE", [1, 3], None, True, False, 9),
        ("PRUNED", [1, 3], 3, True, False, 3),  # stopped after its second rung
        ("PRUNED", [], None, True, False, 0),  # too slow to train, or no budget left to start
        ("RUNNING", [], None, True, False, 1),  # heading for its first rung
        ("RUNNING", [1], None, True, False, 3),  # promoted after its first
        ("RUNNING", [1], None, True, True, 9),  # a reference always goes on: all its rungs
        ("COMPLETE", [1, 3], None, False, False, 0),  # a repeated point reuses its twin's student
        ("FAIL", [1], None, True, False, 0),  # its retry counts instead
    ],
)
def test_a_candidate_counts_what_it_trained_or_is_committed_to(state, reached, stopped_at, trained, reference, epochs):
    assert committed_epochs(state, (1, 3, 9), reached, stopped_at, trained, reference) == epochs


@pytest.mark.parametrize(
    ("rungs", "reduction", "message"),
    [
        ([3], 3, "at least two"),
        ([3, 1], 3, "increasing epochs"),
        ([0, 2], 3, "increasing epochs"),
        ([1, 3], 1, "reduction must be an integer >= 2"),
    ],
)
def test_bad_rungs_are_one_line(rungs, reduction, message):
    with pytest.raises(ConfigError, match=message):
        ParetoSpec(rungs=rungs, reduction=reduction)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_a_bad_budget_is_one_line(budget):
    with pytest.raises(ConfigError, match="budget_epochs must be an integer >= 1"):
        ParetoSpec(rungs=[1, 3], budget_epochs=budget)


@pytest.mark.slow
def test_a_study_with_a_compute_budget_stops_there_with_the_reference_trained_to_the_end(
    tmp_path, shared_cache, capsys
):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=20", "--set", "pareto.rungs=[1, 3]"]
    args += ["--set", "pareto.reduction=2", "--set", "pareto.startup_trials=20", "--set", "pareto.budget_epochs=7"]
    args += ["--set", "pareto.enqueue=[{student_drop: 1, prune_ratio: 0.0}]"]
    main(args)
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = study.get_trials()
    trained = 0
    for trial in trials:
        if "same_as_trial" in trial.user_attrs:
            continue
        trained += 3 if trial.state == TrialState.COMPLETE else trial.user_attrs.get("stopped_at", 0)
    assert trained <= 7 and len(trials) < 20  # the budget, not the trial count, ended the study
    assert trials[0].state == TrialState.COMPLETE  # the reference's 3 epochs were reserved first
    from kdsearch.search.pareto import PARETO

    stored = study.user_attrs["kdsearch"]
    assert PARETO.budget_spent(study, stored["space"], stored["spec"]["train"]["epochs"])  # complete, not partial
    capsys.readouterr()
    main(["study", "status", "--workdir", str(tmp_path)])
    assert f"compute: {trained} of budget_epochs 7 epochs trained or committed" in capsys.readouterr().out


@pytest.mark.slow
def test_a_multi_fidelity_study_stops_candidates_at_rungs_and_a_promoted_one_ends_as_an_uninterrupted_run(
    tmp_path, shared_cache, capsys
):
    args = ["study", "pareto", "--study", str(SMOKE), "--workdir", str(tmp_path), "--no-progress"]
    args += ["--set", "latency.repeats=2", "--set", "pareto.trials=5", "--set", "pareto.rungs=[1, 2]"]
    args += ["--set", "pareto.reduction=2", "--set", "pareto.startup_trials=5"]
    args += ["--set", "pareto.enqueue=[{student_drop: 1, prune_ratio: 0.0, alpha: 0.5}]"]
    main(args)
    storage = f"sqlite:///{tmp_path}/studies.db"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = study.get_trials()
    stopped = [t for t in trials if t.user_attrs.get("stopped_at") == 1]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert stopped and all(t.state == TrialState.PRUNED and "rung_1" in t.user_attrs for t in stopped)
    assert complete and all({"rung_1", "rung_2"} <= set(t.user_attrs) for t in complete)
    reference = trials[0]  # the enqueued point goes on whatever its rank
    assert reference.state == TrialState.COMPLETE and reference.user_attrs["rung_2"] == reference.values[0]
    capsys.readouterr()
    assert main(["study", "status", "--workdir", str(tmp_path), "--json"]) == 0
    rungs = {row["trial"]: row for row in json.loads(capsys.readouterr().out)["rungs"]}
    assert {number for number, row in rungs.items() if row["stopped_at"] == 1} == {t.number for t in stopped}

    # The reference's student, trained 1 epoch, compared, then 1 more, is the uninterrupted 2-epoch run's.
    from mlflow import MlflowClient

    from kdsearch.distill.train import train
    from kdsearch.models.classifiers import load_model
    from kdsearch.search.pareto import pareto_config
    from kdsearch.search.studyfile import build_spec

    spec = build_spec(study.user_attrs["kdsearch"]["spec"])
    config = pareto_config(spec, reference.params)
    config = type(config)(**{**vars(config), "epochs": 2})
    direct = train(config, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    model, _ = load_model(client.download_artifacts(reference.user_attrs["run_id"], "model.pt", str(tmp_path)))
    for (name, tensor), expected in zip(model.state_dict().items(), direct.model.state_dict().values(), strict=True):
        assert torch.equal(tensor, expected.cpu()), name
