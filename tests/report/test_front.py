"""The Pareto report's multi-fidelity parts: the rungs table and the per-rung reference on the figure."""

from __future__ import annotations

from kdsearch.report.front import (
    PAPER_STUDENT,
    ParetoResult,
    Point,
    StoppedCandidate,
    front_figure,
    rungs_table,
)

RUNTIME = "onnx-fp32"


def _point(name, params, latency, rungs, on_front=True) -> Point:
    return Point(name, params, 1000, 1000, {RUNTIME: latency}, rungs.get(15), 70.0, None, on_front, rungs)


def _result(stopped=True) -> ParetoResult:
    teacher = Point("teacher", {}, 2000, 2000, {RUNTIME: 6.0}, None, 87.05, None, False)
    paper = _point("trial 0", PAPER_STUDENT, 3.1, {1: 70.0, 3: 75.0, 15: 80.0}, on_front=False)
    fast = _point("trial 4", {"student_drop": 2, "prune_ratio": 0.5}, 1.3, {1: 60.0, 3: 66.0, 15: 79.5})
    candidates = [
        StoppedCandidate("trial 2", {"student_drop": 4, "prune_ratio": 0.6}, 0.9, 1, {1: 41.0}),
        StoppedCandidate("trial 3", {"student_drop": 1, "prune_ratio": 0.3}, 2.2, 3, {1: 55.0, 3: 71.0}),
    ]
    return ParetoResult(RUNTIME, 1, 1, teacher, [fast, paper], candidates if stopped else [])


def test_the_rungs_table_lists_the_reference_first_then_the_finished_then_the_stopped():
    frame = rungs_table(_result(), "synthetic").frame
    assert list(frame["candidate"]) == ["trial 0 (paper's student)", "trial 4", "trial 3", "trial 2"]
    assert list(frame["val acc after 3 ep"])[:3] == [75.0, 66.0, 71.0]
    assert list(frame["val acc after 1 ep"]) == [70.0, 60.0, 55.0, 41.0]  # every rung a candidate reached
    assert frame["val acc after 15 ep"].isna().tolist() == [False, False, True, True]
    assert frame["stopped after (epochs)"].tolist()[2:] == [3, 1]


def test_a_study_without_rungs_has_no_rungs_table():
    result = _result(stopped=False)
    for point in result.students:
        point.rung_val_acc = {}
    assert rungs_table(result, "synthetic") is None


def test_the_figure_reads_each_rung_against_the_paper_student_after_the_same_epochs():
    figure = front_figure(_result(), "synthetic")
    stopped = [trace for trace in figure.data if trace.meta and trace.meta["role"] == "stopped"]
    assert [(trace.meta["epochs"], list(trace.y)) for trace in stopped] == [(1, [41.0]), (3, [71.0])]
    lines = [shape.y0 for shape in figure.layout.shapes]
    assert lines == [70.0, 75.0, 80.0]
    assert [a.text for a in figure.layout.annotations][:3] == [
        "paper's student, 1 epoch(s): val 70.00",
        "paper's student, 3 epoch(s): val 75.00",
        "paper's student, 15 epoch(s): val 80.00",
    ]


def test_a_candidates_label_says_how_it_was_pruned():
    from kdsearch.report.front import _architecture

    iterative = {"student_drop": 0, "prune_ratio": 0.5, "prune_steps": 3, "sparsity": 0.001, "recovery": "ce"}
    assert _architecture(iterative) == "drop 0, width 1, pruned 50%, recovery ce, in 3 steps, sparsity 0.001"
    unpruned = iterative | {"prune_ratio": 0.0}  # nothing was pruned: steps and sparsity did nothing
    assert _architecture(unpruned) == "drop 0, width 1, recovery ce"
    one_shot = iterative | {"prune_steps": 1, "sparsity": 0.0}
    assert _architecture(one_shot) == "drop 0, width 1, pruned 50%, recovery ce"


def test_the_students_table_says_which_named_student_wins_at_which_latency():
    from kdsearch.report.front import students_table

    teacher = Point("teacher", {}, 2000, 2000, {RUNTIME: 3.0}, None, 87.05, None, False)
    named = [  # (name, latency, test accuracy)
        ("mnasnet", 0.2, 10.3),  # did not train: at chance, so it wins nowhere though it is the fastest
        ("shufflenet", 0.3, 60.0),
        ("lcnet", 0.5, 58.0),  # slower and less accurate than shufflenet: not the best at its latency
        ("mobilenetv2_paper", 1.5, 70.0),
    ]
    points = [
        Point(f"trial {i}", {"student": n}, 1, 1, {RUNTIME: ms}, acc, acc, None, True)
        for i, (n, ms, acc) in enumerate(named)
    ]
    points[3].paper = True
    result = ParetoResult(RUNTIME, 1, 1, teacher, list(reversed(points)), [], chance_test_acc=10.6)
    table = students_table(result, "synthetic")
    frame = table.frame
    assert list(frame["architecture"]) == ["mnasnet", "shufflenet", "lcnet", "mobilenetv2_paper (paper's student)"]
    assert list(frame["best up to this latency"]) == ["chance level", "yes", "", "yes"]
    assert list(frame[f"{RUNTIME} speed-up"]) == [15.0, 10.0, 6.0, 2.0]
    assert "at most 10.60 %" in table.notes[0]
    unmeasured = students_table(ParetoResult(RUNTIME, 1, 1, teacher, points, []), "synthetic").frame
    assert list(unmeasured["best up to this latency"]) == ["yes", "yes", "", "yes"]
    assert students_table(_result(), "synthetic") is None  # built-in architectures: the front table says it all


def test_chance_ceiling_is_the_most_frequent_class_share_plus_two_standard_errors():
    import torch

    from kdsearch.report.front import chance_ceiling

    balanced = torch.arange(10_000) % 10  # 10 %, standard error 0.3 points
    assert abs(chance_ceiling(balanced) - 10.6) < 1e-9
    skewed = torch.tensor([0] * 75 + [1] * 25)  # 75 %, standard error sqrt(.75 * .25 / 100) = 4.33 points
    assert abs(chance_ceiling(skewed) - (75.0 + 2 * 100 * (0.75 * 0.25 / 100) ** 0.5)) < 1e-9
