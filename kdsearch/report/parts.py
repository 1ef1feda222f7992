"""What each study kind adds to its report. Every report has the trials table, the deployment table, the
paper's Fig. 1 and the IG figure (and the maps by method where trials overlay several); a kind's part adds its own tables and figures between them and says which
trial's student the deployment table shows. The report itself knows no kind by name."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import optuna
from optuna.trial import TrialState

from kdsearch.errors import KdsearchError
from kdsearch.report import figures, tables
from kdsearch.report.figures import Figure
from kdsearch.report.front import (
    front_figure,
    front_table,
    optuna_front,
    pareto_result,
    rungs_table,
    students_table,
)
from kdsearch.report.paper import IG_STUDENT_ARM, reported_accuracy
from kdsearch.report.source import Source
from kdsearch.report.tables import Deployment, Table
from kdsearch.search.ablation import ABLATION, ablation_table
from kdsearch.search.pareto import PARETO
from kdsearch.search.study import best_trial
from kdsearch.search.studyfile import apply_overrides, build_spec
from kdsearch.search.tune import GRID, TPE

Parts = tuple[list[Table], list[Figure]]


class ReportPart:
    noun: ClassVar[str]  # "a grid study": how errors name the kind
    flag: ClassVar[str] = "--study"  # the `kdsearch report` flag that takes it
    finished: ClassVar[str] = "complete"  # what counts as done, in the progress line

    def __init__(self, source: Source, overrides: dict[str, Any]) -> None:
        self.source = source
        self.overrides = overrides  # the stored spec's paths adapted to this machine

    def deployment_trials(self, complete: list[optuna.trial.FrozenTrial]):
        """(the trials whose runs may give the deployment table, the student's test accuracy, which student)."""
        best = best_trial(self.source.study)
        chosen = [t for t in complete if best is not None and t.number == best.number]
        student_acc = best.user_attrs.get("test_acc") if best is not None else None
        what = f"the best trial by validation accuracy (trial {best.number})" if best is not None else ""
        return chosen, student_acc, what

    def parts(self, rows: list[dict], measured: Deployment | None, progress: str, notes: list[str]) -> Parts:
        """This kind's tables and figures; ``progress`` is how far a partial study got (empty when complete)."""
        return [], []

    def attribution_methods(self) -> list[str]:
        """The attribution methods whose maps the study's trials overlay (drawn side by side where several)."""
        return []

    def optuna_figures(self, rows: list[dict], notes: list[str]) -> list[Figure]:
        """Optuna's history and parallel coordinates (single-objective kinds), over the params trials have."""
        complete = [row for row in rows if row["val_acc"] is not None]
        if not complete:
            notes.append("Optuna's history and parallel-coordinates figures: no complete trial yet")
            return []
        names = ("t", "alpha", "p", "gamma", "lr", "student_drop")
        params = [p for p in names if any(p in r["params"] for r in complete)]
        study = self.source.study
        return [
            Figure("optimization_history", "Optuna optimisation history", figures.optimization_history(study)),
            Figure("parallel_coordinates", "Optuna parallel coordinates", figures.parallel_coordinates(study, params)),
        ]


class GridPart(ReportPart):
    noun = "a grid study"

    def parts(self, rows, measured, progress, notes) -> Parts:
        heatmaps = figures.grid_heatmaps([r for r in rows if r["val_acc"] is not None], self.source.space)
        if progress:
            heatmaps.update_layout(title=f"{heatmaps.layout.title.text}<br>({progress})")
        width = 350 * len(self.source.space["p"]) + 250
        grid = Figure("grid_heatmaps", "Grid: T × α per p", heatmaps, width=width, height=500)
        return [], [grid, *self.optuna_figures(rows, notes)]


class TPEPart(ReportPart):
    noun = "a TPE study"
    finished = "finished (complete or pruned)"

    def parts(self, rows, measured, progress, notes) -> Parts:
        return [], self.optuna_figures(rows, notes)


class AblationPart(ReportPart):
    noun = "an ablation"
    flag = "--ablation"

    def __init__(self, source: Source, overrides: dict[str, Any]) -> None:
        super().__init__(source, overrides)
        self.ablation = ablation_table(source.study)

    def deployment_trials(self, complete):
        """The kd_ig arm (or the first arm there is), with its mean accuracy over seeds."""
        chosen = [t for t in complete if t.params.get("arm") == IG_STUDENT_ARM] or complete
        arm = chosen[0].params.get("arm") if chosen else None
        row = next((r for r in self.ablation.rows if r.arm == arm), None)
        if row is None:
            return chosen, None, ""
        return chosen, row.mean, f"the {row.arm} arm (mean over {row.n} seed(s))"

    def parts(self, rows, measured, progress, notes) -> Parts:
        marker = f" ({progress})" if progress else ""
        titled = dataclasses.replace(self.ablation, title=self.ablation.title + marker)
        reported = {arm: reported_accuracy()[row] for arm, row in tables.PAPER_ROWS.items()}
        reported |= tables.REFERENCE_AT_ACCURACY
        bars = Figure(
            "ablation_bars",
            "Ablation: test accuracy with 95% CI",
            figures.ablation_bars(self.ablation, reported, progress),
        )
        # Where several methods' arms ran: with kd_ig alone, the comparisons table says it all.
        methods = [tables.methods_table(titled)] if len(self.ablation.methods) > 1 else []
        return [*tables.ablation_tables(titled, reported_accuracy()), *methods], [bars]

    def attribution_methods(self) -> list[str]:
        return list(dict.fromkeys(row.maps for row in self.ablation.rows if row.maps is not None))


class ParetoPart(ReportPart):
    noun = "a Pareto study"

    def parts(self, rows, measured, progress, notes) -> Parts:
        """The front's table and figures; a note instead when the data or the teacher are not here."""
        source = self.source
        if not any(t.state == TrialState.COMPLETE for t in source.trials):
            notes.append("Pareto front: no complete trial yet")
            return [], []
        optuna_figure = Figure("optuna_pareto_front", "Optuna's Pareto front", optuna_front(source.study))
        spec = build_spec(apply_overrides(source.spec, self.overrides))
        try:
            result = pareto_result(source.study, spec, source.client)
        except (KdsearchError, OSError) as error:
            notes.append(f"Pareto front table and figure skipped: {error}")
            return [], [optuna_figure]
        dataset = measured.dataset if measured is not None else spec.train.data.label or spec.train.data.dataset
        front = front_figure(result, dataset, progress)
        extra = [t for t in (rungs_table(result, dataset), students_table(result, dataset)) if t is not None]
        return [front_table(result, dataset), *extra], [
            Figure("pareto_front", "Pareto front: accuracy vs latency", front, 1100, 650),
            optuna_figure,
        ]


# Each study kind's report part, by the kind's stored name.
REPORT_PARTS: dict[str, type[ReportPart]] = {
    GRID.name: GridPart,
    TPE.name: TPEPart,
    ABLATION.name: AblationPart,
    PARETO.name: ParetoPart,
}
