"""What a workdir's studies produced, in a few lines a person reads: the exported student against the
teacher, the ablation's paired differences, where the reports and the model are, and how to browse the runs.

It reads only what the reports and exports wrote (``report.json`` and its CSV tables, ``export.json``),
so it prints the numbers those measured and nothing it would have to assume: the speed-up is the one
the Pareto report measured for the exported trial against the teacher in the same runtime, batch and
threads; where no report measured it, the line says so.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdsearch.errors import ConfigError


@dataclass
class Report:
    path: Path  # the report's directory
    study: str
    kind: str
    progress: str
    tables: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tables = self.path / "tables"


def _reports(workdir: Path) -> list[Report]:
    found = []
    for meta in sorted(workdir.glob("*/report.json")):
        record = json.loads(meta.read_text())
        found.append(Report(meta.parent, record["study"], record["kind"], record.get("progress", "")))
    return found


def _exports(workdir: Path) -> list[tuple[Path, dict]]:
    return [(meta.parent, json.loads(meta.read_text())) for meta in sorted(workdir.glob("*/export.json"))]


def _front_row(reports: list[Report], study: str, trial: int) -> tuple[pd.Series, pd.Series] | None:
    """(the exported trial's row, the teacher's row) of the Pareto report of ``study``, where there is one."""
    for report in reports:
        table = report.tables / "pareto_front.csv"
        if report.kind != "pareto" or report.study != study or not table.is_file():
            continue
        front = pd.read_csv(table)
        names = front["student"].astype(str)
        # "trial 4 (also 11, 13) (paper's student)": a point proposed again shares its first trial's row.
        mine = front[names.str.match(rf"trial ({trial}\b|\d+ \(also [\d, ]*\b{trial}\b)")]
        teacher = front[names == "teacher"]
        if len(mine) and len(teacher):
            return mine.iloc[0], teacher.iloc[0]
    return None


def _student_lines(export_dir: Path, export: dict, reports: list[Report]) -> list[str]:
    source, model = export["source"], export["model"]
    fp32 = "onnx-fp32"
    accuracy = export["accuracy"].get(fp32, export["accuracy"].get("torch"))
    where = f"trial {source['trial']} of {source['study']}" if source.get("study") else f"run {source['run_id']}"
    lines = [f"best student: {where}, {model['params']:,} parameters, {accuracy:.2f} % test accuracy (ONNX fp32)"]
    rows = _front_row(reports, source.get("study"), source.get("trial")) if source.get("study") else None
    if rows is not None:
        mine, teacher = rows
        speedup = mine.get(f"{fp32} speed-up")
        lines.append(
            f"  against the teacher ({int(teacher['params']):,} parameters, {teacher['test acc (%)']:.2f} %): "
            f"{teacher['params'] / model['params']:.1f}x fewer parameters, "
            + (
                f"{speedup:.2f}x faster in ONNX Runtime fp32 ({mine['architecture']})"
                if isinstance(speedup, float) and not math.isnan(speedup)
                else "speed-up not measured"
            )
        )
    else:
        lines.append("  speed-up against the teacher: not measured here (no Pareto report of this study)")
    parity = export["parity"]
    lines.append(
        f"  exported: {export_dir / 'model.onnx'} (its MODEL_CARD.md beside it); ONNX agrees with PyTorch on "
        f"{parity['top1_agreement']:.2f} % of {export['test_images']:,} test images"
    )
    return lines


def _ablation_lines(report: Report) -> list[str]:
    table = report.tables / "ablation_comparisons.csv"
    if not table.is_file():
        return []
    rows = pd.read_csv(table)
    differences = ", ".join(
        f"{row['comparison'].removesuffix(' vs baseline')} {row['Δ (pp)']:+.2f} [{row['95% CI low']:+.2f}, "
        f"{row['95% CI high']:+.2f}]"
        for _, row in rows.iterrows()
        if str(row["comparison"]).endswith(" vs baseline")
    )
    seeds = int(rows["n"].min()) if len(rows) else 0
    return [
        f"ablation {report.study} ({seeds} seeds; test accuracy vs baseline, points, paired 95 % CI): {differences}"
    ]


def workdir_summary(workdir: str | Path) -> str:
    """The summary of what ``workdir``'s reports and exports hold; ConfigError when it holds neither."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} does not exist")
    reports, exports = _reports(workdir), _exports(workdir)
    if not reports and not exports:
        raise ConfigError(f"--workdir {workdir} holds no report (*/report.json) and no export (*/export.json)")
    lines = []
    for export_dir, export in exports:
        lines += _student_lines(export_dir, export, reports)
    for report in reports:
        if report.kind == "ablation":
            lines += _ablation_lines(report)
    lines += [f"report of {report.study} ({report.progress}): {report.path / 'index.html'}" for report in reports]
    lines.append(f"browse the runs and studies: kdsearch ui --workdir {shlex.quote(str(workdir))} --dashboard")
    return "\n".join(lines)
