"""``kdsearch summary``: a workdir's export, ablation and reports in a few lines, from the files they wrote.

The files are written here in the shapes ``kdsearch report`` and ``kdsearch export`` give them (the
columns of a real demo run's tables), which takes milliseconds where running the demo takes minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kdsearch.cli.main import main
from kdsearch.errors import ConfigError
from kdsearch.report.summary import workdir_summary

FRONT_COLUMNS = [
    "student", "architecture", "params", "MFLOPs", "onnx-fp32 ms", "onnx-fp32 speed-up", "val acc (%)",
    "test acc (%)", "on front",
]  # fmt: skip


def _report(workdir: Path, name: str, study: str, kind: str, tables: dict[str, pd.DataFrame]) -> None:
    (workdir / name / "tables").mkdir(parents=True)
    meta = {"study": study, "kind": kind, "progress": "3 of 3 complete"}
    (workdir / name / "report.json").write_text(json.dumps(meta))
    for table, frame in tables.items():
        frame.to_csv(workdir / name / "tables" / f"{table}.csv", index=False)


def _export(workdir: Path, trial: int, params: int = 543_498) -> None:
    (workdir / "export").mkdir()
    summary = {
        "source": {"study": "demo-pareto", "kind": "pareto", "trial": trial, "run_id": "abc"},
        "model": {"params": params},
        "test_images": 10000,
        "parity": {"top1_agreement": 100.0, "max_abs_logit_diff": 6.7e-06},
        "accuracy": {"torch": 72.17, "onnx-fp32": 72.17},
    }
    (workdir / "export" / "export.json").write_text(json.dumps(summary))


@pytest.fixture
def workdir(tmp_path) -> Path:
    front = pd.DataFrame(
        [
            ["teacher", "teacher", 2_236_682, 176.0, 2.04, 1.0, None, 87.05, ""],
            ["trial 0 (also 4) (paper's student)", "drop 5, width 1", 543_498, 117.4, 1.46, 1.40, 73.6, 72.2, "yes"],
            ["trial 1", "drop 5, width 1, pruned 50%", 147_578, 30.3, 0.53, 3.86, 47.3, 47.3, "yes"],
        ],
        columns=FRONT_COLUMNS,
    )
    comparisons = pd.DataFrame(
        [
            ["kd vs baseline", 2, 0.114, -0.838, 1.068, 0.37],
            ["kd_ig vs baseline", 2, 0.026, -1.058, 1.108, 0.82],
            ["kd_ig vs kd", 2, -0.09, -2.12, 1.94, 0.67],
        ],
        columns=["comparison", "n", "Δ (pp)", "95% CI low", "95% CI high", "p (paired t)"],
    )
    _report(tmp_path, "report-pareto", "demo-pareto", "pareto", {"pareto_front": front})
    _report(tmp_path, "report-ablation", "demo-ablation", "ablation", {"ablation_comparisons": comparisons})
    return tmp_path


@pytest.mark.parametrize("trial", [0, 4])  # 4: proposed again, listed in trial 0's row
def test_the_summary_names_the_student_its_speed_up_the_ablation_the_reports_and_the_ui(workdir, trial):
    _export(workdir, trial)
    lines = workdir_summary(workdir).splitlines()
    assert (
        lines[0] == f"best student: trial {trial} of demo-pareto, 543,498 parameters, 72.17 % test accuracy (ONNX fp32)"
    )
    assert lines[1] == (
        "  against the teacher (2,236,682 parameters, 87.05 %): 4.1x fewer parameters, 1.40x faster in ONNX Runtime "
        "fp32 (drop 5, width 1)"
    )
    assert lines[2].startswith(f"  exported: {workdir / 'export' / 'model.onnx'} ")
    assert lines[2].endswith("ONNX agrees with PyTorch on 100.00 % of 10,000 test images")
    assert lines[3] == (
        "ablation demo-ablation (2 seeds; test accuracy vs baseline, points, paired 95 % CI): "
        "kd +0.11 [-0.84, +1.07], kd_ig +0.03 [-1.06, +1.11]"
    )  # kd_ig vs kd is not against the baseline
    assert lines[4] == f"report of demo-ablation (3 of 3 complete): {workdir / 'report-ablation' / 'index.html'}"
    assert lines[5] == f"report of demo-pareto (3 of 3 complete): {workdir / 'report-pareto' / 'index.html'}"
    assert lines[6] == f"browse the runs and studies: kdsearch ui --workdir {workdir} --dashboard"


def test_a_speed_up_no_report_measured_is_said_to_be_unmeasured(tmp_path):
    _export(tmp_path, 2)
    lines = workdir_summary(tmp_path).splitlines()
    assert lines[1] == "  speed-up against the teacher: not measured here (no Pareto report of this study)"


def test_a_workdir_without_reports_or_exports_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="holds no report"):
        workdir_summary(tmp_path)
    assert main(["summary", "--workdir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --workdir {tmp_path / 'nowhere'} does not exist\n"
