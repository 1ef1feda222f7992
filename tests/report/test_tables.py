"""kdsearch.report.tables without stores: how a Table shows and writes its numbers, the trials table's
columns, Table 3 and its comparisons, and the deployment table's rows and notes (test_render checks the
same tables filled from real studies)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kdsearch.report.tables import (
    REFERENCE_AT_ACCURACY,
    Deployment,
    Table,
    ablation_tables,
    deployment_table,
    html_page,
    methods_table,
    timing_contention,
    trials_table,
)
from kdsearch.search.ablation import AblationTable, ArmRow, Comparison, MethodRow

NAN = math.nan


def _table(**kwargs) -> Table:
    frame = pd.DataFrame(
        {"quantity": ["params", "acc", "note"], "value": [1234567.0, 91.456, None], "flag": [True, NAN, "a|b"]}
    )
    return Table("t", "A <title>", frame, **kwargs)


# --- Table --------------------------------------------------------------------------------------


def test_shown_formats_by_column_then_by_row_and_leaves_missing_cells_empty():
    table = _table(formats={"value": ".1f"}, row_formats={"params": ",.0f", "acc": ".2f"})
    assert table.shown().to_dict("list") == {
        "quantity": ["params", "acc", "note"],
        "value": ["1234567.0", "91.5", ""],  # the column's format wins over the rows'
        "flag": ["True", "", "a|b"],  # a bool is not a number; a row format applies to numbers only
    }
    by_row = _table(row_formats={"params": ",.0f", "acc": ".2f"}).shown()
    assert by_row["value"].tolist() == ["1,234,567", "91.46", ""]
    assert _table().shown()["value"].tolist() == ["1234567.0", "91.456", ""]  # no format: as Python prints it


def test_markdown_has_title_header_escaped_pipes_and_notes():
    table = _table(formats={"value": ".0f"}, notes=["first note", "second"])
    assert table.markdown() == (
        "### A <title>\n"
        "\n"
        "| quantity | value | flag |\n"
        "| --- | --- | --- |\n"
        "| params | 1234567 | True |\n"
        "| acc | 91 |  |\n"
        "| note |  | a\\|b |\n"
        "\n"
        "first note  \n"
        "second  \n"
    )
    assert _table().markdown().endswith("| note |  | a\\|b |\n")  # no notes, no blank line


def test_html_fragment_escapes_title_cells_and_notes():
    frame = pd.DataFrame({"arm": ["<script>"], "acc": [90.0]})
    fragment = Table("t", "x < y", frame, {"acc": ".1f"}, ["a & b"]).html_fragment()
    assert fragment.startswith("<h3>x &lt; y</h3>\n<table") and "<td>&lt;script&gt;</td>" in fragment
    assert "<td>90.0</td>" in fragment and fragment.endswith("<p class='note'>a &amp; b</p>")
    assert "<script>" not in fragment


def test_html_page_is_a_whole_document():
    page = html_page("a & b", "<p>body</p>")
    assert page.startswith("<!doctype html>\n<html><head><meta charset='utf-8'><title>a &amp; b</title><style>")
    assert page.endswith("</style></head>\n<body>\n<p>body</p>\n</body></html>\n")


def test_write_keeps_full_precision_in_the_csv(tmp_path):
    frame = pd.DataFrame({"trial": [0, 1], "acc": [91.23456789, NAN]})
    paths = Table("trials", "T", frame, {"acc": ".2f"}).write(tmp_path)
    assert paths == [tmp_path / "trials.csv", tmp_path / "trials.md", tmp_path / "trials.html"]
    assert (tmp_path / "trials.csv").read_text() == "trial,acc\n0,91.23456789\n1,\n"
    assert "| 0 | 91.23 |" in (tmp_path / "trials.md").read_text()
    page = (tmp_path / "trials.html").read_text()
    assert page.startswith("<!doctype html>") and "<td>91.23</td>" in page and "<title>T</title>" in page


# --- trials_table ----------------------------------------------------------------------------------


def test_trials_table_columns_name_the_parameters_like_the_paper():
    rows = [
        {"trial": 0, "state": "complete", "params": {"seed": 1, "p": 0.1, "alpha": 0.5, "t": 2.0, "lr": 0.00123456, "student_drop": 0}, "val_acc": 80.0, "test_acc": 79.5},
        {"trial": 1, "state": "complete", "params": {"t": 4.0, "alpha": 0.5, "p": 0.1, "lr": 0.01, "seed": 2, "student_drop": 3}, "val_acc": 82.0, "test_acc": 81.0},
    ]  # fmt: skip
    table = trials_table(rows, "Trials", ["a note"])
    assert list(table.frame.columns) == [
        "trial", "T", "α", "p", "lr", "blocks dropped", "seed", "val acc (%)", "test acc (%)", "rank", "state",
    ]  # fmt: skip
    shown = table.shown()
    assert shown.iloc[0].tolist() == ["1", "4", "0.5", "0.1", "0.01", "3", "2", "82.00", "81.00", "1", "complete"]
    assert shown.iloc[1].tolist() == ["0", "2", "0.5", "0.1", "0.00123", "0", "1", "80.00", "79.50", "2", "complete"]
    assert (table.name, table.title, table.notes) == ("trials", "Trials", ["a note"])


def test_blocks_dropped_is_a_whole_number_beside_a_trial_without_it():
    rows = [
        {"trial": 0, "state": "complete", "params": {"t": 2.0, "student_drop": 3}, "val_acc": 80.0, "test_acc": 79.5},
        {"trial": 1, "state": "queued", "params": {}, "val_acc": None, "test_acc": None},
    ]
    shown = trials_table(rows, "t", []).shown()
    assert shown["blocks dropped"].tolist() == ["3", ""]


def test_trials_table_shows_agreement_only_when_a_trial_has_it():
    rows = [
        {"trial": 0, "state": "complete", "params": {"arm": "kd"}, "val_acc": 70.0, "test_acc": 69.0, "agreement_spearman": 0.61234, "agreement_iou_top10": 0.4},
        {"trial": 1, "state": "pruned", "params": {"arm": "ig"}, "val_acc": None, "test_acc": None},
    ]  # fmt: skip
    shown = trials_table(rows, "t", []).shown()
    assert list(shown.columns) == [
        "trial",
        "arm",
        "val acc (%)",
        "test acc (%)",
        "Spearman",
        "IoU@10%",
        "rank",
        "state",
    ]
    assert shown.iloc[0].tolist() == ["0", "kd", "70.00", "69.00", "0.612", "0.400", "1", "complete"]
    assert shown.iloc[1].tolist() == ["1", "ig", "", "", "", "", "", "pruned"]
    assert "Spearman" not in trials_table([rows[1]], "t", []).frame.columns


def test_a_study_without_trials_has_an_empty_table_with_the_usual_columns():
    table = trials_table([], "t", [])
    assert list(table.frame.columns) == ["trial", "val acc (%)", "test acc (%)", "rank", "state"] and table.frame.empty
    assert table.markdown().splitlines()[2:] == ["| trial | val acc (%) | test acc (%) | rank | state |", "| --- | --- | --- | --- | --- |"]  # fmt: skip


# --- Table 3 -------------------------------------------------------------------------------------

REPORTED = {"Teacher": 93.91, "Baseline Student": 91.43, "KD": 92.29, "IG": 92.01, "KD & IG": 92.45}


def _arm(arm, n=3, mean=80.0, std=0.5, ci=(79.0, 81.0), delta=0.0, p=NAN, spearman=0.5, iou=0.3):
    return ArmRow(arm, n, mean, std, ci, delta, p, spearman, iou)


def test_table3_rows_deltas_and_reported_values():
    rows = [_arm("baseline"), _arm("kd", mean=81.234, std=0.25, delta=1.234, p=0.0123), _arm("kd_ig_at", mean=82.0, delta=2.0, p=0.2)]  # fmt: skip
    comparisons = [Comparison("kd", "baseline", 3, 1.234, (0.5, 1.9), 0.0123)]
    arms, pairs = ablation_tables(AblationTable(88.5, rows, comparisons, "Ablation"), REPORTED)
    records = arms.frame.to_dict("records")
    assert [r["method"] for r in records] == ["teacher", "baseline", "kd", "kd_ig_at"]
    teacher, baseline, kd, at = records
    assert teacher["test acc mean (%)"] == 88.5 and teacher["mean ± std"] == "88.50"
    assert teacher["reported acc (%)"] == 93.91 and math.isnan(teacher["n"])
    assert baseline["Δ vs baseline"] is None or math.isnan(baseline["Δ vs baseline"])
    assert baseline["reported acc (%)"] == 91.43 and _missing(baseline["reported Δ"])
    assert kd["mean ± std"] == "81.23 ± 0.25" and kd["Δ vs baseline"] == 1.234 and kd["p (paired t)"] == 0.0123
    assert kd["reported acc (%)"] == 92.29 and kd["reported Δ"] == 0.86  # 92.29 - 91.43, rounded to 2 decimals
    assert at["reported acc (%)"] == REFERENCE_AT_ACCURACY["kd_ig_at"] == 92.42 and at["reported Δ"] == 0.99
    assert any("reference implementation's saved students" in note for note in arms.notes)
    shown = {row["method"]: row for row in arms.shown().to_dict("records")}
    assert (shown["kd"]["Δ vs baseline"], shown["kd"]["p (paired t)"], shown["kd"]["reported Δ"]) == (
        "+1.23",
        "0.0123",
        "+0.86",
    )
    assert pairs.frame.to_dict("records") == [
        {"comparison": "kd vs baseline", "n": 3, "Δ (pp)": 1.234, "95% CI low": 0.5, "95% CI high": 1.9, "p (paired t)": 0.0123}
    ]  # fmt: skip
    assert pairs.shown().iloc[0].tolist() == ["kd vs baseline", "3", "+1.23", "+0.50", "+1.90", "0.0123"]
    assert (arms.name, arms.title, pairs.name) == ("ablation", "Ablation", "ablation_comparisons")


def test_table3_without_paper_values_or_at_arms():
    arms, _ = ablation_tables(AblationTable(None, [_arm("baseline"), _arm("ig_shuffled", delta=-0.5)], [], "t"), {})
    records = {r["method"]: r for r in arms.frame.to_dict("records")}
    assert records["teacher"]["mean ± std"] == "n/a" and _missing(records["ig_shuffled"]["reported acc (%)"])
    assert _missing(records["ig_shuffled"]["reported Δ"])  # nothing reported for an arm the paper lacks
    assert not any("reference implementation" in note for note in arms.notes)


def test_the_methods_table_has_each_methods_cost_and_paired_intervals():
    vs_base = Comparison("kd_saliency", "baseline", 3, 0.9, (0.4, 1.4), 0.02)
    vs_kd = Comparison("kd_saliency", "kd", 3, 0.5, (-0.1, 1.1), 0.07)
    saliency = MethodRow("kd_saliency", "saliency", 3, 91.1, 2.0, vs_base, vs_kd, None, 0.4, 0.3)
    ig = MethodRow("kd_ig", "integrated_gradients", 3, 90.4, NAN, vs_base, None, None, 0.5, 0.35)
    table = methods_table(AblationTable(92.0, [], [], "Ablation", [saliency, ig]))
    records = {r["arm"]: r for r in table.frame.to_dict("records")}
    assert records["kd_saliency"]["maps"] == "saliency" and records["kd_saliency"]["ms per map"] == 2.0
    assert (records["kd_saliency"]["Δ vs kd"], records["kd_saliency"]["vs kd CI low"]) == (0.5, -0.1)
    assert (records["kd_saliency"]["Δ vs baseline"], records["kd_saliency"]["vs baseline CI high"]) == (0.9, 1.4)
    assert _missing(records["kd_saliency"]["Δ vs shuffled"]) and _missing(records["kd_ig"]["Δ vs kd"])
    shown = {r["arm"]: r for r in table.shown().to_dict("records")}
    assert (shown["kd_saliency"]["Δ vs kd"], shown["kd_saliency"]["p vs kd"], shown["kd_ig"]["ms per map"]) == (
        "+0.50",
        "0.07",
        "",  # an IG cache made before costs were recorded
    )
    assert table.name == "ablation_methods" and table.title == "Attribution methods: Ablation"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --- deployment ------------------------------------------------------------------------------------


def _deployment(metrics, **kwargs) -> Deployment:
    values = {"dataset": "synthetic", "device": "cpu:test", "teacher_acc": 90.0, "student_acc": 85.0}
    return Deployment(metrics=metrics, student_source="trial 3", **{**values, **kwargs})


METRICS = {
    "teacher_params": 2000.0,
    "student_params": 500.0,
    "teacher_size_bytes": 2_500_000.0,
    "student_size_bytes": 0.0,
    "latency_ms_teacher_b16": 8.0,
    "latency_ms_student_b16": 2.0,
    "latency_ms_teacher_b2": 3.0,
    "latency_ms_student_b2": 0.0,  # a ratio by zero is no ratio
    "latency_ms_teacher_onnx_int8_b2": 1.5,
    "latency_ms_student_onnx_int8_b2": 0.5,
    "latency_threads": 1.0,
}


def test_deployment_rows_in_order_with_ratios_where_they_mean_something():
    table = deployment_table(_deployment(METRICS), {("teacher", "params"): 100.0, ("student", "params"): 40.0})
    rows = {row["quantity"]: row for row in table.frame.to_dict("records")}
    assert list(rows) == [
        "dataset",
        "hardware",
        "parameters",
        "FLOPs per image",
        "size on disk, state dict (MB)",
        "latency, torch eager, batch 2 (ms)",  # batches in numeric order: 2 before 16
        "latency, torch eager, batch 16 (ms)",
        "latency, ONNX Runtime int8, batch 2 (ms)",
        "latency per batch, batch size not stated (ms)",
        "test accuracy (%)",
    ]
    assert (
        rows["parameters"]["teacher/student reported"] == 2.5 and rows["parameters"]["teacher/student measured"] == 4.0
    )
    assert rows["size on disk, state dict (MB)"]["teacher measured"] == 2.5
    assert rows["size on disk, state dict (MB)"]["teacher/student measured"] is None  # student 0 bytes
    assert rows["latency, torch eager, batch 16 (ms)"]["teacher/student measured"] == 4.0
    assert rows["latency, torch eager, batch 2 (ms)"]["teacher/student measured"] is None
    assert rows["latency, ONNX Runtime int8, batch 2 (ms)"]["teacher/student measured"] == 3.0
    assert rows["FLOPs per image"]["teacher measured"] is None  # not measured: an empty cell
    for quantity in ("dataset", "hardware", "test accuracy (%)"):
        assert rows[quantity]["teacher/student measured"] is None and rows[quantity]["teacher/student reported"] is None
    assert (
        rows["hardware"]["teacher measured"] == "cpu:test" and rows["hardware"]["teacher reported"] == "NVIDIA RTX 3090"
    )
    shown = {row["quantity"]: row for row in table.shown().to_dict("records")}
    assert shown["size on disk, state dict (MB)"]["teacher measured"] == "2.500"
    assert shown["latency, torch eager, batch 16 (ms)"]["student measured"] == "2.000"
    assert (
        shown["test accuracy (%)"]["student measured"] == "85.00" and shown["parameters"]["student measured"] == "500"
    )


@pytest.mark.parametrize(
    ("threads", "said"), [(1.0, ", 1 thread."), (4.0, ", 4 threads."), (None, "(QDQ) on training images).")]
)
def test_deployment_notes_say_the_thread_count_and_missing_onnx_timings(threads, said):
    metrics = {key: value for key, value in METRICS.items() if "onnx" not in key and key != "latency_threads"}
    if threads is not None:
        metrics["latency_threads"] = threads
    notes = deployment_table(_deployment(metrics), {}).notes
    assert notes[0].startswith("measured: synthetic; student = trial 3. Latency: median of timed repeats")
    assert notes[0].endswith(said)
    assert "ONNX Runtime latencies were not measured in this study (its latency.onnx_runtimes is empty)." in notes
    assert not any(
        "ONNX Runtime latencies were not measured" in n for n in deployment_table(_deployment(METRICS), {}).notes
    )


def test_timing_contention_is_the_busiest_of_the_four_timings():
    metrics = {
        "latency_ms_teacher_other_cores": 0.1,
        "latency_ms_student_other_cores": 0.05,
        "latency_ms_teacher_onnx_other_cores": 0.3,
        "latency_ms_student_onnx_other_cores": 0.2,
        "latency_ms_x_other_cores": 9.0,  # not a teacher's or student's timing
    }
    assert timing_contention(metrics) == 0.3
    notes = " ".join(deployment_table(_deployment(metrics), {}).notes)
    assert "other processes kept up to 0.30 cores busy" in notes
    assert timing_contention({"latency_ms_student_other_cores": 0.0}) == 0.0
