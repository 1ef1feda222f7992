"""What the paper reports, shipped with kdsearch: its Table 3 and 4 and its set-up, and the literature
points of its Fig. 1 (CIFAR-10)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdsearch.report import tables

# Read by path: importlib.resources reads package data too, but a path is what pandas takes.
RESOURCES = Path(__file__).resolve().parent / "resources"
IG_STUDENT_ARM = "kd_ig"  # the ablation arm whose student the deployment table and Fig. 1 show


def literature() -> pd.DataFrame:
    """The literature table of the paper's Fig. 1 and Table 1 (CIFAR-10), shipped with kdsearch."""
    return pd.read_csv(RESOURCES / "literature_cifar10.csv")


def paper_results() -> pd.DataFrame:
    """The paper's reported results (Tables 3 and 4, and its set-up), shipped with kdsearch."""
    return pd.read_csv(RESOURCES / "paper_results.csv", dtype={"value": str})


def reported_accuracy() -> dict[str, float]:
    """Table 3 of the paper by row name: Teacher, Baseline Student, KD, IG, KD & IG."""
    results = paper_results()
    rows = results[(results["table"] == "3") & (results["metric"] == "test_accuracy")]
    return {row["row"]: float(row["value"]) for _, row in rows.iterrows()}


def reported_deployment() -> dict[tuple[str, str], float]:
    """{("teacher" | "student", "params" | "latency_per_batch" | "test_accuracy"): value} from the paper."""
    results = paper_results()
    found: dict[tuple[str, str], float] = {}
    for _, row in results.iterrows():
        who = str(row["row"]).lower()
        if row["table"] == "setup" and who in ("teacher", "student") and row["metric"] == "params":
            found[(who, "params")] = float(row["value"])
        if row["table"] == "4":
            found[(who, "latency_per_batch")] = float(row["value"])
    accuracy = reported_accuracy()
    found[("teacher", "test_accuracy")] = accuracy[tables.PAPER_ROWS["teacher"]]
    found[("student", "test_accuracy")] = accuracy[tables.PAPER_ROWS[IG_STUDENT_ARM]]
    return found
