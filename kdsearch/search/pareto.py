"""The accuracy × latency study: which students are both accurate and fast where they deploy.

    kdsearch study pareto --study studies/cifar10-pareto.yaml --trials 24 --latency onnx-fp32

A multi-objective Optuna study (TPE by default, or NSGA-II) maximising validation accuracy and
minimising the latency measured in the chosen runtime, over the student's architecture (blocks
dropped, width, pruning ratio) and the KD/IG/AT hyperparameters of the study file's ``pareto`` section.

Optuna's pruners are single-objective, so trials are not stopped on their learning curves. Instead each
trial measures first and trains second: the architecture is built (pruned from the teacher) and timed
(``deploy.runtime_latency``, cached per architecture); one slower than ``max_latency_ms`` is recorded
as PRUNED with its latency and never trained. Constraints (``max_latency_ms``, ``min_val_acc``) reach
the samplers through ``Trial.set_constraint``, so infeasible trials do not shape the front.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from kdsearch.config import KDConfig, ParetoSampler, PruneConfig, TrainConfig, replace, to_dict
from kdsearch.distill.train import build_student
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model
from kdsearch.models.pruning import model_stages
from kdsearch.runtime.timing import CALIBRATION_IMAGES, metric_name, runtime_latency
from kdsearch.search.rungs import RUNG_ATTR, STOPPED_ATTR, committed_epochs, promotable, rung_accuracies
from kdsearch.search.study import Objective, StudyHandle, StudyKind
from kdsearch.search.studyfile import ParetoSpec, StudySpec, check_files
from kdsearch.search.trial import TrialRunner
from kdsearch.search.tune import check_selectable, check_students

SAMPLERS = {
    ParetoSampler.TPE: lambda pareto, seed: optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, n_startup_trials=pareto.startup_trials
    ),
    ParetoSampler.NSGA2: lambda pareto, seed: optuna.samplers.NSGAIISampler(seed=seed),
}


def trial_params(trial: optuna.Trial, pareto: ParetoSpec, stages: int = 0) -> dict[str, Any]:
    """The trial's architecture and hyperparameters, suggested in a fixed order; ``stages``: the teacher's,
    for per-stage prune ratios."""
    if pareto.students is not None:
        params: dict[str, Any] = {"student": trial.suggest_categorical("student", list(pareto.students))}
    else:
        params = {
            "student_drop": trial.suggest_int("student_drop", *pareto.student_drop),
            "width": trial.suggest_categorical("width", list(pareto.widths)),
        }
        if pareto.stage_ratios is None:
            params["prune_ratio"] = trial.suggest_categorical("prune_ratio", list(pareto.prune_ratios))
        for stage in range(stages if pareto.stage_ratios is not None else 0):
            params[f"stage_ratio_{stage}"] = trial.suggest_categorical(
                f"stage_ratio_{stage}", list(pareto.stage_ratios)
            )
    for name, values in (
        ("importance", pareto.importances),
        ("recovery", pareto.recovery),
        ("prune_steps", pareto.prune_steps),
        ("sparsity", pareto.sparsities),
    ):
        if values is not None:
            params[name] = trial.suggest_categorical(name, list(values))
    for name in ("t", "alpha", "p", "gamma"):
        bounds = getattr(pareto, name)
        if bounds is not None:
            params[name] = trial.suggest_float(name, bounds.low, bounds.high, log=bounds.log)
    return params


def pareto_config(spec: StudySpec, params: dict[str, Any], image_size: int = 32) -> TrainConfig:
    """A trial's config; per-stage ratios apply to the student's own stages, the first ones of the
    teacher's (a student with trailing blocks dropped may have fewer)."""
    config = spec.configure(params)
    student = replace(config.student, width_mult=float(params.get("width", config.student.width_mult)))
    importance = params.get("importance", config.prune.importance)
    prune = replace(config.prune, importance=importance)
    recovery = {  # how a pruned candidate gets to its target: in steps, after sparsity training or at once
        "importance": importance,
        "steps": params.get("prune_steps", config.prune.steps),
        "sparsity": params.get("sparsity", config.prune.sparsity),
    }
    ratio = params.get("prune_ratio", 0.0)
    if ratio > 0:
        prune = PruneConfig(ratio=ratio, **recovery)
    if "stage_ratio_0" in params:
        stages = model_stages(build_model(student), image_size)
        ratios = tuple(float(params[f"stage_ratio_{stage}"]) for stage in range(stages))
        if any(r > 0 for r in ratios):
            prune = PruneConfig(stage_ratios=ratios, **recovery)
    config = replace(config, student=student, prune=prune)
    if params.get("recovery") == "ce":  # plain cross-entropy: no teacher in the loss
        config = replace(
            config,
            kd=replace(config.kd, alpha=0.0),
            attention=replace(config.attention, gamma=0.0),
            overlay=replace(config.overlay, p=0.0),
        )
    return config


def _constrain(trial: optuna.Trial, pareto: ParetoSpec, val_acc: float | None, latency: float) -> None:
    """Both constraints, feasible at <= 0, as Optuna's samplers and best_trials read them; an untrained
    (too slow) trial's accuracy constraint is unknown and set to 0."""
    trial.set_constraint("latency", latency - pareto.max_latency_ms if pareto.max_latency_ms is not None else -1.0)
    short = pareto.min_val_acc - val_acc if pareto.min_val_acc is not None and val_acc is not None else -1.0
    trial.set_constraint("val_acc", 0.0 if val_acc is None else short)


def _is_reference(params: dict[str, Any], enqueue: Sequence[dict[str, Any]]) -> bool:
    """Whether ``params`` are one of the enqueued points (references, which always go on)."""
    return any(all(params.get(key) == value for key, value in point.items()) for point in enqueue)


def spent_epochs(
    trials: list[optuna.trial.FrozenTrial], rung_ends: Sequence[int], enqueue: Sequence[dict[str, Any]]
) -> int:
    """Epochs the study's candidates have trained or are committed to (``rungs.committed_epochs``);
    ``rung_ends``: the rungs, or (train.epochs,) without them."""
    return sum(
        committed_epochs(
            trial.state.name,
            rung_ends,
            list(rung_accuracies(trial.user_attrs)),
            trial.user_attrs.get(STOPPED_ATTR),
            trained="same_as_trial" not in trial.user_attrs,
            reference=_is_reference(trial.params, enqueue),
        )
        for trial in trials
    )


def _budget(space: dict[str, Any], train_epochs: int) -> tuple[int | None, tuple[int, ...], list[dict[str, Any]]]:
    """(budget_epochs, rung ends, enqueued points) from a Pareto study's stored space."""
    rungs = space.get("rungs")
    return space.get("budget_epochs"), tuple(rungs) if rungs else (train_epochs,), space.get("enqueue", [])


def _rung_gate(trial: optuna.Trial, pareto: ParetoSpec, latency: float, params: dict[str, Any]):
    """After each epoch: at a rung's end, record the candidate's accuracy there and stop it (TrialPruned)
    unless it is among the best 1/reduction of the candidates that ended the rung, and (with
    ``budget_epochs``) its next rung fits in what the other candidates left of the budget; references (the
    enqueued points) always go on, so they give every rung a student at equal training."""
    reference = _is_reference(params, pareto.enqueue)

    def after_epoch(epoch: int, row: dict) -> None:
        epochs = epoch + 1
        if epochs not in pareto.rungs[:-1]:
            return
        key = RUNG_ATTR.format(epochs=epochs)
        others = [
            (other.user_attrs[key], other.user_attrs["latency_ms"])
            for other in trial.study.get_trials(deepcopy=False)
            if other.number != trial.number
            and key in other.user_attrs
            and "latency_ms" in other.user_attrs
            and "same_as_trial" not in other.user_attrs  # a repeated point: its twin already counts
        ]
        trial.set_user_attr(key, row["val_acc"])
        if not reference and not promotable((row["val_acc"], latency), others, pareto.reduction):
            trial.set_user_attr(STOPPED_ATTR, epochs)
            raise optuna.TrialPruned(
                f"val_acc {row['val_acc']:.2f} at {latency:.2f} ms after {epochs} epochs: not among the best "
                f"1/{pareto.reduction} of {len(others) + 1} at that rung"
            )
        if not reference and pareto.budget_epochs is not None:
            next_end = pareto.rungs[pareto.rungs.index(epochs) + 1]
            trials = [other for other in trial.study.get_trials(deepcopy=False) if other.number != trial.number]
            spent = spent_epochs(trials, pareto.rungs, pareto.enqueue)
            if spent + next_end > pareto.budget_epochs:
                trial.set_user_attr(STOPPED_ATTR, epochs)
                raise optuna.TrialPruned(
                    f"promoted after {epochs} epochs, but its {next_end} epochs would pass budget_epochs "
                    f"{pareto.budget_epochs} ({spent} spent or committed by the others)"
                )

    return after_epoch


def training_key(config: TrainConfig) -> str:
    """What ``config`` trains, as text: configs with one key train the same student (training is seeded).
    Settings that cannot change the training are left out, so that points differing only in them are one:
    an unpruned student's pruning recovery (importance, steps, sparsity) and the temperature of a loss
    without KD (plain cross-entropy recovery, alpha 0)."""
    if not config.prune.active:
        config = replace(config, prune=PruneConfig())
    if config.kd.alpha == 0:
        config = replace(config, kd=replace(config.kd, temperature=KDConfig().temperature))
    return json.dumps(to_dict(config), sort_keys=True)


def _twin(
    trial: optuna.Trial, key: str, key_of: Callable[[optuna.trial.FrozenTrial], str], reference: bool
) -> optuna.trial.FrozenTrial | None:
    """A trial of the same study that trains what ``key`` trains and finished, or (unless ``reference``:
    references always go on) was stopped at a rung, where it would stop again; finished ones first."""
    states = [optuna.trial.TrialState.COMPLETE] + ([] if reference else [optuna.trial.TrialState.PRUNED])
    for state in states:
        for other in trial.study.get_trials(deepcopy=False, states=(state,)):
            finished_or_stopped = state == optuna.trial.TrialState.COMPLETE or STOPPED_ATTR in other.user_attrs
            if other.number != trial.number and finished_or_stopped and key_of(other) == key:
                return other
    return None


class ParetoSearch(StudyKind):
    name = "pareto"
    unit = "Pareto trials"
    directions = ("maximize", "minimize")

    def validate(self, spec: StudySpec) -> None:
        pareto = spec.pareto
        if pareto is None:
            raise ConfigError("no Pareto search space: add a 'pareto' section to the study file")
        check_selectable(spec)
        check_files(spec)
        if pareto.students is not None:  # the named students, each trained as it is named
            check_students([spec.configure({"student": name}) for name in pareto.students])
            return
        build_model(replace(spec.train.student, drop_blocks=pareto.student_drop[1]))  # the deepest drop must fit
        from_teacher = spec.train.student_init == "teacher" or any(ratio > 0 for ratio in pareto.prune_ratios)
        if from_teacher and any(width != spec.train.teacher.width_mult for width in pareto.widths):
            raise ConfigError(
                "pareto widths other than the teacher's cannot start from the teacher's weights (student_init "
                "teacher, or prune_ratios > 0): use widths [1.0] or a random init without pruning"
            )

    def space(self, spec: StudySpec) -> dict[str, Any]:
        return json.loads(json.dumps(to_dict(spec.pareto)))

    def total(self, space: dict[str, Any]) -> int:
        return space["trials"]

    def points(self, space: dict[str, Any]) -> list[dict[str, Any]]:
        return list(space.get("enqueue", []))

    def budget_spent(self, study: optuna.Study, space: dict[str, Any], train_epochs: int) -> bool:
        """With ``budget_epochs``: True once a new candidate's first rung would pass the budget."""
        budget, ends, enqueue = _budget(space, train_epochs)
        return budget is not None and spent_epochs(study.get_trials(deepcopy=False), ends, enqueue) + ends[0] > budget

    def budget_line(self, study: optuna.Study, space: dict[str, Any], train_epochs: int) -> str | None:
        budget, ends, enqueue = _budget(space, train_epochs)
        if budget is None:
            return None
        spent = spent_epochs(study.get_trials(deepcopy=False), ends, enqueue)
        return f"compute: {spent} of budget_epochs {budget} epochs trained or committed"

    def algorithms(self, spec: StudySpec, joining: bool):
        return SAMPLERS[ParetoSampler(spec.pareto.sampler)](spec.pareto, None if joining else spec.pareto.seed), None

    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        pareto = spec.pareto
        most = {name: getattr(pareto, name).high for name in ("alpha", "p", "gamma") if getattr(pareto, name)}
        return [spec.configure(most)]

    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        spec, prepared = handle.spec, runner.prepared
        pareto = spec.pareto
        calibration = prepared.splits.train_images[:CALIBRATION_IMAGES]
        image_size = prepared.splits.image_size
        stages = model_stages(build_model(spec.train.teacher), image_size) if pareto.stage_ratios is not None else 0

        keys: dict[int, str] = {}  # trial number -> training_key, as other trials look for their twins

        def key_of(other: optuna.trial.FrozenTrial) -> str:
            if other.number not in keys:
                keys[other.number] = training_key(pareto_config(spec, other.params, image_size))
            return keys[other.number]

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            params = trial_params(trial, pareto, stages)
            config = pareto_config(spec, params, image_size)
            twin = _twin(trial, training_key(config), key_of, _is_reference(params, pareto.enqueue))
            if twin is not None and twin.state == optuna.trial.TrialState.COMPLETE:
                # Training is seeded, so a point that trains what a finished one trained is that student: reuse
                # it (TPE proposes a finished point again once a categorical space is small; points differing
                # only in settings the training ignores are the same student).
                for key in ("latency_ms", "test_acc", "run_id"):
                    trial.set_user_attr(key, twin.user_attrs.get(key))
                trial.set_user_attr("same_as_trial", twin.number)
                _constrain(trial, pareto, *twin.values)
                return tuple(twin.values)
            if twin is not None:  # the same student stopped at a rung before: it would stop there again
                for key, value in twin.user_attrs.items():
                    if key.startswith("rung_") or key in ("latency_ms", STOPPED_ATTR):
                        trial.set_user_attr(key, value)
                trial.set_user_attr("same_as_trial", twin.number)
                raise optuna.TrialPruned(f"the same student as trial {twin.number}, stopped at a rung")
            if pareto.rungs is not None:
                config = replace(config, epochs=pareto.rungs[-1])  # one schedule, stopped at a rung or not
            model, architecture = build_student(config, prepared.inputs)
            timing = runtime_latency(
                model, architecture, pareto.latency, pareto.batch, pareto.threads, spec.latency, calibration,
                spec.train.cache_dir,
            )  # fmt: skip
            latency = timing.latency_ms
            trial.set_user_attr("latency_ms", latency)
            trial.set_user_attr("latency_other_cores", timing.other_cores)
            too_slow = pareto.max_latency_ms is not None and latency > pareto.max_latency_ms
            if too_slow and not _is_reference(params, pareto.enqueue):  # a reference is trained wherever it lies
                _constrain(trial, pareto, None, latency)
                raise optuna.TrialPruned(f"{latency:.2f} ms > max_latency_ms {pareto.max_latency_ms}: not trained")
            name = metric_name(pareto.latency, pareto.batch)
            after_epoch = _rung_gate(trial, pareto, latency, params) if pareto.rungs is not None else None
            result = runner.train(trial, config, evaluate=lambda result: {name: latency}, after_epoch=after_epoch)
            if pareto.rungs is not None:
                trial.set_user_attr(RUNG_ATTR.format(epochs=pareto.rungs[-1]), result.val_acc)
            _constrain(trial, pareto, result.val_acc, latency)
            return result.val_acc, latency

        return objective


PARETO = ParetoSearch()
