"""The report's tables as pandas DataFrames, written as CSV (full precision), Markdown and HTML.

Three kinds: a study's trials (T, alpha, p, validation and test accuracy, rank by validation accuracy),
the ablation in the form of the paper's Table 3 (with its paired comparisons), and the deployment
table (parameters, FLOPs, size, latency of teacher and student) with the paper's figures labelled
"reported" beside ours labelled "measured". Numbers come in; nothing here reads a store.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kdsearch.infra.text import ACCURACY, number

# The paper's Table 3 rows, by ablation arm (its paper_results.csv names them so).
PAPER_ROWS = {"teacher": "Teacher", "baseline": "Baseline Student", "kd": "KD", "ig": "IG", "kd_ig": "KD & IG"}
# Not in the paper: the attention-transfer students saved by its public reference implementation
# (nordlinglab/ModelCompression-IntegratedGradients), named with their CIFAR-10 test accuracy; gamma 0.8
# on that code's AT scale (see kdsearch.distill.attention.at_loss), one run each.
REFERENCE_AT_ACCURACY = {"at": 91.58, "ig_at": 91.84, "kd_at": 92.20, "kd_ig_at": 92.42}


@dataclass
class Table:
    """A numeric DataFrame plus how to show it; ``formats`` maps a column to a format spec for md/html."""

    name: str  # file stem
    title: str
    frame: pd.DataFrame
    formats: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # For tables whose rows hold different quantities: format by the row's first cell, for the columns
    # that ``formats`` does not name.
    row_formats: dict[str, str] = field(default_factory=dict)

    def shown(self) -> pd.DataFrame:
        """The frame as strings: formatted numbers, empty cells for missing values."""
        first = self.frame.columns[0] if len(self.frame.columns) else None
        shown = {}
        for column in self.frame:
            specs = [
                self.formats.get(column) or self.row_formats.get(str(label))
                for label in (self.frame[first] if first is not None else [])
            ]
            shown[column] = [_cell(value, spec) for value, spec in zip(self.frame[column], specs, strict=True)]
        return pd.DataFrame(shown, columns=self.frame.columns)

    def markdown(self) -> str:
        shown = self.shown()
        header = "| " + " | ".join(str(c) for c in shown.columns) + " |"
        rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
        rows = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in shown.to_numpy()]
        notes = [""] + [f"{note}  " for note in self.notes] if self.notes else []
        return "\n".join([f"### {self.title}", "", header, rule, *rows, *notes]) + "\n"

    def html_fragment(self) -> str:
        notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in self.notes)
        table = self.shown().to_html(index=False, border=0, classes="kdsearch", escape=True)
        return f"<h3>{html.escape(self.title)}</h3>\n{table}\n{notes}"

    def write(self, directory: Path) -> list[Path]:
        """``<name>.csv``, ``<name>.md`` and ``<name>.html`` in ``directory``."""
        paths = [directory / f"{self.name}.{suffix}" for suffix in ("csv", "md", "html")]
        self.frame.to_csv(paths[0], index=False)
        paths[1].write_text(self.markdown())
        paths[2].write_text(html_page(self.title, self.html_fragment()))
        return paths


def _cell(value: Any, spec: str | None) -> str:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if value is None or (number and math.isnan(float(value))):
        return ""
    if spec is not None and number:
        return format(float(value), spec)
    return str(value)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table.kdsearch{border-collapse:collapse;margin:0.5em 0}
table.kdsearch th,table.kdsearch td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}
table.kdsearch th{background:#f4f4f4}.note{color:#555;font-size:90%}.partial{color:#b00;font-weight:bold}"""


def html_page(title: str, body: str) -> str:
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# --- a study's trials -------------------------------------------------------------------------

TRIAL_COLUMNS = {
    "t": "T",
    "alpha": "α",
    "p": "p",
    "lr": "lr",
    "student_drop": "blocks dropped",
    "student": "student",
    "method": "overlay method",
    "arm": "arm",
}


def trials_table(rows: Sequence[dict[str, Any]], title: str, notes: list[str]) -> Table:
    """One row per trial: its parameters, val/test accuracy and rank by validation accuracy (1 = best).

    ``rows``: {"trial", "state", "params": {...}, "val_acc", "test_acc", and optionally
    "agreement_spearman", "agreement_iou_top10"}. Trials without a value (running, queued, pruned)
    are listed with their state and no rank.
    """
    names = [name for name in TRIAL_COLUMNS if any(name in row["params"] for row in rows)]
    names += sorted({name for row in rows for name in row["params"]} - set(names))
    records = []
    for row in rows:
        record = {"trial": row["trial"]}
        record |= {TRIAL_COLUMNS.get(name, name): row["params"].get(name) for name in names}
        record |= {"val acc (%)": row.get("val_acc"), "test acc (%)": row.get("test_acc")}
        if any("agreement_spearman" in other for other in rows):
            record |= {"Spearman": row.get("agreement_spearman"), "IoU@10%": row.get("agreement_iou_top10")}
        record["state"] = row["state"]
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        frame = pd.DataFrame(columns=["trial", "val acc (%)", "test acc (%)", "rank", "state"])
    else:
        ranks = frame["val acc (%)"].astype(float).rank(ascending=False, method="min")
        frame.insert(len(frame.columns) - 1, "rank", ranks.map(lambda r: None if math.isnan(r) else int(r)))
        frame = frame.sort_values(["rank", "trial"], na_position="last", key=_nan_last).reset_index(drop=True)
    formats = {"val acc (%)": ACCURACY, "test acc (%)": ACCURACY, "Spearman": ".3f", "IoU@10%": ".3f"}
    formats |= {
        "trial": ".0f",
        "rank": ".0f",
        "T": "g",
        "α": "g",
        "p": "g",
        "lr": ".3g",
        "seed": ".0f",
        "blocks dropped": ".0f",
    }
    return Table("trials", title, frame, formats, notes)


def _nan_last(column: pd.Series) -> pd.Series:
    return column.astype(float).fillna(math.inf)


# --- the ablation: the paper's Table 3 --------------------------------------------------------


def ablation_tables(table, reported: dict[str, float]) -> tuple[Table, Table]:
    """Table 3 (per arm) and its paired comparisons, from kdsearch.search.ablation's ``AblationTable``.

    ``reported``: the paper's test accuracy by Table 3 row name (Teacher, Baseline Student, KD, …).
    """
    # Long because Table 3 has 13 columns spelled out once, with their formats and notes; one table, one place.
    base = reported.get(PAPER_ROWS["baseline"])
    records = [
        {
            "method": "teacher",
            "n": None,
            "test acc mean (%)": table.teacher_test_acc,
            "std": None,
            "mean ± std": number(table.teacher_test_acc),
            "95% CI low": None,
            "95% CI high": None,
            "Δ vs baseline": None,
            "p (paired t)": None,
            "Spearman": None,
            "IoU@10%": None,
            "reported acc (%)": reported.get(PAPER_ROWS["teacher"]),
            "reported Δ": None,
        }
    ]
    for row in table.rows:
        paper = reported.get(PAPER_ROWS.get(row.arm, ""), REFERENCE_AT_ACCURACY.get(row.arm))
        is_base = row.arm == "baseline"
        records.append(
            {
                "method": row.arm,
                "n": row.n,
                "test acc mean (%)": row.mean,
                "std": row.std,
                "mean ± std": f"{number(row.mean)} ± {number(row.std)}",
                "95% CI low": row.ci[0],
                "95% CI high": row.ci[1],
                "Δ vs baseline": None if is_base else row.delta,
                "p (paired t)": None if is_base else row.p_value,
                "Spearman": row.spearman,
                "IoU@10%": row.iou,
                "reported acc (%)": paper,
                "reported Δ": None if is_base or paper is None or base is None else round(paper - base, 2),
            }
        )
    formats = {
        "n": ".0f",
        "test acc mean (%)": ACCURACY,
        "std": ACCURACY,
        "95% CI low": ACCURACY,
        "95% CI high": ACCURACY,
        "Δ vs baseline": "+.2f",
        "p (paired t)": ".3g",
        "Spearman": ".3f",
        "IoU@10%": ".3f",
        "reported acc (%)": ACCURACY,
        "reported Δ": "+.2f",
    }
    notes = [
        "measured: test accuracy over seeds (mean, sample std, 95% t-interval); Δ and p are paired over seeds "
        "against the baseline; Spearman and IoU@10%: agreement of the students' IG maps with the teacher's.",
        "reported: the paper's Table 3 (CIFAR-10, one run each, no spread given).",
    ]
    if any(row.n == 2 for row in table.rows):
        notes.append(
            "An arm with 2 seeds has a 95% t-interval 12.7 standard errors wide on each side (t with 1 degree of "
            "freedom): two seeds say almost nothing about the spread, so such an interval is uninformative, "
            "not wrong; 3 seeds narrow it to 4.3."
        )
    if any(row.arm in REFERENCE_AT_ACCURACY for row in table.rows):
        notes.append(
            "reported for at, ig_at, kd_at, kd_ig_at: the reference implementation's saved students (not in the "
            "paper; gamma 0.8 on its own AT scale, not comparable with this study's gamma; one run each)."
        )
    arms = Table("ablation", table.title, pd.DataFrame.from_records(records), formats, notes)
    comparisons = pd.DataFrame.from_records(
        [
            {
                "comparison": f"{c.arm} vs {c.reference}",
                "n": c.n,
                "Δ (pp)": c.delta,
                "95% CI low": c.ci[0],
                "95% CI high": c.ci[1],
                "p (paired t)": c.p_value,
            }
            for c in table.comparisons
        ]
    )
    pair_formats = {"n": ".0f", "Δ (pp)": "+.2f", "95% CI low": "+.2f", "95% CI high": "+.2f", "p (paired t)": ".3g"}
    pair_notes = ["Paired t-tests on the per-seed differences of test accuracy (percentage points)."]
    return arms, Table("ablation_comparisons", "Paired comparisons over seeds", comparisons, pair_formats, pair_notes)


def methods_table(table) -> Table:
    """Which attribution, if any, helps a student: each method's arm (KD + its maps' overlay) with the cost of
    a teacher map and its paired differences against the baseline, against KD and against its shuffled
    control, from kdsearch.search.ablation's ``AblationTable``."""
    records = []
    for row in table.methods:
        record = {"arm": row.arm, "maps": row.method, "n": row.n, "test acc mean (%)": row.mean}
        record["ms per map"] = row.map_ms
        for label, comparison in (("baseline", row.vs_baseline), ("kd", row.vs_kd), ("shuffled", row.vs_shuffled)):
            present = comparison is not None
            record[f"Δ vs {label}"] = comparison.delta if present else None
            record[f"vs {label} CI low"] = comparison.ci[0] if present else None
            record[f"vs {label} CI high"] = comparison.ci[1] if present else None
            record[f"p vs {label}"] = comparison.p_value if present else None
        records.append(record | {"Spearman": row.spearman, "IoU@10%": row.iou})
    differences = {column: "+.2f" for column in records[0] if column.startswith(("Δ", "vs "))} if records else {}
    formats = {"n": ".0f", "test acc mean (%)": ACCURACY, "ms per map": ".3g", "Spearman": ".3f", "IoU@10%": ".3f"}
    formats |= differences | {f"p vs {label}": ".3g" for label in ("baseline", "kd", "shuffled")}
    notes = [
        "Per attribution method, the arm KD + that method's overlay (Eq. 5-7, the same p): Δ and its 95% interval "
        "are paired over seeds against the baseline, against KD alone (what the method's overlay adds) and "
        "against the same maps shuffled across images (whether their alignment matters), where those arms ran.",
        "ms per map: the teacher's map cost where its cache was computed (empty for a cache made before costs "
        "were recorded); Spearman and IoU@10%: agreement of the students' maps with the teacher's "
        "(ablation.agreement_method).",
    ]
    return Table(
        "ablation_methods", f"Attribution methods: {table.title}", pd.DataFrame.from_records(records), formats, notes
    )


# --- deployment -------------------------------------------------------------------------------


@dataclass
class Deployment:
    """What was measured for one teacher and one student (MLflow metrics of a trial's run)."""

    dataset: str  # the run's data label, e.g. "CIFAR-10 (JPEG q75 copy)"
    device: str  # where latency was measured
    metrics: dict[str, float]  # teacher_params, student_flops, latency_ms_student_b128, latency_threads, …
    teacher_acc: float | None
    student_acc: float | None
    student_source: str  # which run or arm the student figures are from


# Cores that other processes may use during a latency measurement before the report calls it unclean: a
# second one-thread study worker uses ~1, background noise on an idle machine ~0.05.
BUSY_MACHINE_CORES = 0.25


def _ratio(a: Any, b: Any) -> float | None:
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return a / b if numbers and b != 0 else None


def timing_contention(metrics: dict[str, float]) -> float:
    """The most cores other processes kept busy during a run's latency timings; inf where not recorded."""
    others = [
        metrics[f"latency_ms_{who}_{onnx}other_cores"]
        for who in ("teacher", "student")
        for onnx in ("", "onnx_")
        if f"latency_ms_{who}_{onnx}other_cores" in metrics
    ]
    return max(others) if others else math.inf


# Metric infix (deploy.onnx_latency_metrics) -> the row's words; torch eager's metrics have none.
LATENCY_ROWS = {"": "torch eager", "onnx_fp32": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}
NO_RATIOS = {"teacher/student reported": None, "teacher/student measured": None}  # rows a ratio means nothing for


def _side_by_side(quantity, teacher_reported, teacher, student_reported, student) -> dict[str, Any]:
    return {
        "quantity": quantity,
        "teacher reported": teacher_reported,
        "teacher measured": teacher,
        "student reported": student_reported,
        "student measured": student,
        "teacher/student reported": _ratio(teacher_reported, student_reported),
        "teacher/student measured": _ratio(teacher, student),
    }


def _deployment_records(measured: Deployment, reported: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    m = measured.metrics
    records = [
        _side_by_side("dataset", "CIFAR-10", measured.dataset, "CIFAR-10", measured.dataset) | NO_RATIOS,
        _side_by_side("hardware", "NVIDIA RTX 3090", measured.device, "NVIDIA RTX 3090", measured.device) | NO_RATIOS,
        _side_by_side(
            "parameters",
            reported.get(("teacher", "params")),
            m.get("teacher_params"),
            reported.get(("student", "params")),
            m.get("student_params"),
        ),
        _side_by_side("FLOPs per image", None, m.get("teacher_flops"), None, m.get("student_flops")),
        _side_by_side(
            "size on disk, state dict (MB)",
            None,
            _megabytes(m.get("teacher_size_bytes")),
            None,
            _megabytes(m.get("student_size_bytes")),
        ),
    ]
    for runtime, label in LATENCY_ROWS.items():
        prefix = "latency_ms_teacher_" + (f"{runtime}_" if runtime else "")
        for batch in sorted(int(key.removeprefix(prefix + "b")) for key in m if re.fullmatch(prefix + r"b\d+", key)):
            teacher = m.get(f"{prefix}b{batch}")
            student = m.get(prefix.replace("teacher", "student") + f"b{batch}")
            records.append(_side_by_side(f"latency, {label}, batch {batch} (ms)", None, teacher, None, student))
    records.append(
        _side_by_side(
            "latency per batch, batch size not stated (ms)",
            reported.get(("teacher", "latency_per_batch")),
            None,
            reported.get(("student", "latency_per_batch")),
            None,
        )
    )
    accuracy = _side_by_side(
        "test accuracy (%)",
        reported.get(("teacher", "test_accuracy")),
        measured.teacher_acc,
        reported.get(("student", "test_accuracy")),
        measured.student_acc,
    )
    return records + [accuracy | NO_RATIOS]


def _deployment_notes(measured: Deployment) -> list[str]:
    threads = measured.metrics.get("latency_threads")
    notes = [
        f"measured: {measured.dataset}; student = {measured.student_source}. Latency: median of timed repeats "
        f"after warm-up, torch eager fp32 in eval mode on {measured.device}; ONNX Runtime on the CPU (fp32, and "
        "int8 quantised statically (QDQ) on training images)" + (f", {_threads(threads)}." if threads else "."),
        "reported: the paper (CIFAR-10, NVIDIA RTX 3090; Table 4 gives latency per batch without the batch size, "
        "and the KD & IG student's test accuracy from Table 3).",
        "teacher/student: the compression factor for parameters, the speed-up for latency.",
    ]
    if not any(key.startswith("latency_ms_teacher_onnx_") for key in measured.metrics):
        notes.append("ONNX Runtime latencies were not measured in this study (its latency.onnx_runtimes is empty).")
    contention = timing_contention(measured.metrics)
    if math.isinf(contention):
        notes.append(
            "Whether other processes were busy while these latencies were measured was not recorded (a run "
            "logged before kdsearch recorded it, or a system without /proc/stat); bench/latency.py times the models on a quiet machine."
        )
    elif contention >= BUSY_MACHINE_CORES:
        notes.append(
            f"Not a clean timing: other processes kept up to {contention:.2f} cores busy while these latencies "
            "were measured (a process outside kdsearch, or a study worker logged before kdsearch paused its other "
            "workers during timings); time the models on a quiet machine instead (bench/latency.py)."
        )
    return notes


def deployment_table(measured: Deployment, reported: dict[tuple[str, str], float]) -> Table:
    """Teacher and student side by side, each "reported" (the paper) and "measured" (this study).

    Size is the saved state dict's bytes, as measured by the study. The paper gives latency "per batch" on an RTX 3090
    without the batch size, so its figures get a row of their own rather than one of ours.
    """
    records = _deployment_records(measured, reported)
    frame = pd.DataFrame.from_records(records)
    formats = {"teacher/student reported": ".2f", "teacher/student measured": ".2f"}
    row_formats = {"parameters": ",.0f", "FLOPs per image": ",.0f", "size on disk, state dict (MB)": ".3f"}
    row_formats |= {record["quantity"]: ".3f" for record in records if record["quantity"].startswith("latency")}
    row_formats["test accuracy (%)"] = ACCURACY
    title = f"Deployment: teacher vs student ({measured.dataset})"
    frame = frame.astype(object).where(frame.notna(), None)
    return Table("deployment", title, frame, formats, _deployment_notes(measured), row_formats)


def _megabytes(size_bytes: float | None) -> float | None:
    return None if size_bytes is None else size_bytes / 1e6


def _threads(count: float) -> str:
    return "1 thread" if int(count) == 1 else f"{int(count)} threads"
