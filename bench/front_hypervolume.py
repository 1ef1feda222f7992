"""Hypervolume of Pareto fronts from their reports, in latency relative to the teacher timed with them.

    python bench/front_hypervolume.py studies/results/cifar10-pareto studies/results/cifar10-pareto-mf

Each argument is a Pareto study's report folder; its ``tables/pareto_front.csv`` holds the front's students
and the teacher, all timed together by the report in the study's runtime. Two studies that ran on
different machines (or whose study database is gone, so they cannot be timed together again) compare
only in latency relative to their own teacher: here each front point is (validation accuracy, latency ÷
the teacher's latency in the same render), and the hypervolume (accuracy ↑, relative latency ↓) is taken
against the reference point (accuracy 0, relative latency 1: the teacher's speed), the region of students
more accurate than nothing and faster than the teacher; ``--reference-latency 0.45`` bounds it to students
at least 1/0.45 = 2.2x faster (a study capped by ``max_latency_ms`` has no front beyond its cap). The reuse of ``bench/multifidelity.py``'s
``hypervolume`` keeps one definition. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from multifidelity import hypervolume


def relative_front(report: Path) -> tuple[list[tuple[float, float]], str]:
    """The front's (validation accuracy, latency / teacher's latency) and the runtime column used."""
    table = pd.read_csv(report / "tables" / "pareto_front.csv")
    column = next(name for name in table.columns if name.endswith(" ms"))  # the objective's runtime comes first
    teacher = table.loc[table["student"] == "teacher", column].iloc[0]
    front = table[table["on front"] == "yes"]
    return [(float(row["val acc (%)"]), float(row[column]) / teacher) for _, row in front.iterrows()], column


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--reference-latency", type=float, default=1.0, help="relative to the teacher's")
    args = parser.parse_args()
    reference = (0.0, args.reference_latency)
    results = {}
    for report in args.reports:
        points, column = relative_front(report)
        results[str(report)] = {"runtime": column, "front": points, "hypervolume": hypervolume(points, reference)}
        shown = ", ".join(
            f"{accuracy:.2f} % at {latency:.3f}" for accuracy, latency in sorted(points, key=lambda p: p[1])
        )
        print(f"{report}: {len(points)} front points ({column} ÷ teacher): {shown}")
        volume = results[str(report)]["hypervolume"]
        print(f"  hypervolume against (0 %, {args.reference_latency:g} x the teacher's latency): {volume:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
