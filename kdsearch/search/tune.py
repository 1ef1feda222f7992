"""The grid and TPE study kinds: the KD/IG hyperparameters searched over a study file's base config.

A grid is a queue of every point of t × alpha × p, each evaluated exactly once (see ``kdsearch.search.study``);
TPE samples ``tpe.trials`` trials from the ranges of the study file and prunes them on the per-epoch
validation accuracy.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import optuna

from kdsearch.config import TrainConfig, replace, to_dict
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model
from kdsearch.search.study import Objective, StudyHandle, StudyKind
from kdsearch.search.studyfile import Pruner, StudySpec, check_files
from kdsearch.search.trial import TrialRunner

# Trials report 1-based epochs, and Optuna prunes once a step is >= n_warmup_steps: 2 keeps the
# first epoch, whose accuracy is still close to chance, from deciding anything.
PRUNERS: dict[Pruner, Callable[[StudySpec], optuna.pruners.BasePruner]] = {
    Pruner.MEDIAN: lambda spec: optuna.pruners.MedianPruner(n_startup_trials=spec.tpe.startup_trials, n_warmup_steps=2),
    Pruner.HYPERBAND: lambda spec: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.train.epochs),
    Pruner.NONE: lambda spec: optuna.pruners.NopPruner(),
}


CATEGORICAL_AXES = ("student", "method")  # searched by name; the other axes are numbers


def check_students(configs: list[TrainConfig]) -> None:
    """Each distinct student of the trials' configs can be built and gives logits (a named student of
    another family included), checked once each."""
    from kdsearch.distill.preflight import check_student, student_image_size

    for student in dict.fromkeys(config.student for config in configs):
        check_student(student, student_image_size(configs[0].data))


def check_selectable(spec: StudySpec) -> None:
    if spec.train.data.val_size <= 0:
        raise ConfigError("studies select on validation accuracy: train.data.val_size must be > 0")


class GridSearch(StudyKind):
    name = "grid"
    unit = "grid points"
    queue = True

    def validate(self, spec: StudySpec) -> None:
        if spec.grid is None:
            raise ConfigError("no grid: give --t, --alpha and --p, or a 'grid' section in the study file")
        check_selectable(spec)
        check_files(spec)
        # Every trial's config is built, and so checked; each student once.
        check_students([spec.configure(point) for point in self.points(self.space(spec))])

    def space(self, spec: StudySpec) -> dict[str, Any]:
        return spec.grid.axes()

    def total(self, space: dict[str, Any]) -> int:
        return len(self.points(space))

    def points(self, space: dict[str, Any]) -> list[dict[str, Any]]:
        names = list(space)  # t, alpha, p (, gamma): the first axis varies slowest
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]

    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        return [spec.configure(point) for point in self.points(space)]

    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        space = handle.space

        def objective(trial: optuna.Trial) -> float:
            params = {
                name: trial.suggest_categorical(name, values)
                if name in CATEGORICAL_AXES
                else trial.suggest_float(name, min(values), max(values))
                for name, values in space.items()
            }
            return runner.train(trial, handle.spec.configure(params)).val_acc

        return objective


class TPESearch(StudyKind):
    name = "tpe"
    unit = "TPE trials"

    def validate(self, spec: StudySpec) -> None:
        if spec.tpe is None:
            raise ConfigError("no TPE search space: add a 'tpe' section to the study file")
        check_selectable(spec)
        check_files(spec)
        if spec.tpe.student_drop is not None:
            build_model(replace(spec.train.student, drop_blocks=spec.tpe.student_drop[1]))  # the deepest drop must fit
        check_students([spec.configure({"student": name}) for name in spec.tpe.student or ()])

    def space(self, spec: StudySpec) -> dict[str, Any]:
        space = json.loads(json.dumps(to_dict(spec.tpe)))
        if space["gamma"] is None:
            del space["gamma"]  # as TPE studies stored before the AT axis existed hold it
        return space

    def total(self, space: dict[str, Any]) -> int:
        return space["trials"]

    def algorithms(self, spec: StudySpec, joining: bool):
        # constant_liar: concurrent workers treat each other's running trials as bad, so they spread out.
        # A joining worker leaves the seed unset: two workers with one seed would sample the same points.
        sampler = optuna.samplers.TPESampler(
            seed=None if joining else spec.tpe.seed, constant_liar=True, n_startup_trials=spec.tpe.startup_trials
        )
        return sampler, PRUNERS[Pruner(spec.tpe.pruner)](spec)

    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        most = {"alpha": spec.tpe.alpha.high, "p": spec.tpe.p.high}
        if spec.tpe.gamma is not None:
            most["gamma"] = spec.tpe.gamma.high
        # One config per overlay method on the axis, so that every method's maps are prepared once.
        return (
            [spec.configure({**most, "method": method}) for method in spec.tpe.method]
            if spec.tpe.method
            else [spec.configure(most)]
        )

    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        tpe = handle.spec.tpe

        def objective(trial: optuna.Trial) -> float:
            params = {
                name: trial.suggest_float(name, bounds.low, bounds.high, log=bounds.log)
                for name, bounds in (
                    ("t", tpe.t),
                    ("alpha", tpe.alpha),
                    ("p", tpe.p),
                    ("gamma", tpe.gamma),
                    ("lr", tpe.lr),
                )
                if bounds is not None
            }
            if tpe.student_drop is not None:
                params["student_drop"] = trial.suggest_int("student_drop", *tpe.student_drop)
            for name in CATEGORICAL_AXES:
                if getattr(tpe, name) is not None:
                    params[name] = trial.suggest_categorical(name, list(getattr(tpe, name)))
            return runner.train(trial, handle.spec.configure(params), prune=True).val_acc

        return objective


GRID = GridSearch()
TPE = TPESearch()
