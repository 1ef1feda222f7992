"""Optuna studies over a study file: a grid evaluated point by point, TPE with pruning, and workers.

    kdsearch study grid --study studies/smoke.yaml --t 1,2.5 --alpha 0.01,0.1 --p 0.1
    kdsearch study worker --study-name smoke-grid-1a2b3c4d --storage postgresql://kd@db/kd

A study lives in an Optuna RDB storage (a SQLite file by default, PostgreSQL to share it). Its user
attribute ``kdsearch`` holds the study file's spec and the search space, so a worker needs only the
study's name and storage to join it.

A grid study is a queue: each point of the product is enqueued once as a WAITING trial, and workers
claim queued trials atomically (WAITING → RUNNING is a row-locked update in the storage). Optuna's
GridSampler is not used because it lets concurrent workers evaluate a point twice (its documentation
says so), while a grid point here must be evaluated exactly once. Running trials send heartbeats; a
trial whose worker died goes stale, is failed by the next worker that looks, and
``RetryHeartbeatStaleTrialCallback`` queues a copy, so no point is lost. Re-opening a grid study
queues again only the points that have no complete, running or queued trial.

The objective is the validation accuracy of the trial's last epoch; the test accuracy is recorded
beside it and never used for selection.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.config import TrainConfig
from kdsearch.errors import ConfigError, StudyError, TrainingDiverged
from kdsearch.infra.storage import check_database
from kdsearch.infra.tensor_cache import content_key
from kdsearch.search.optuna_storage import HeartbeatConfig, open_storage, storage_failed
from kdsearch.search.rungs import rung_accuracies
from kdsearch.search.studyfile import StudySpec, apply_overrides, build_spec, check_study_name
from kdsearch.search.trial import Prepared, TrialRunner, prepare
from kdsearch.track.tracking import Tracker, run_tags, tracking_failed

log = logging.getLogger(__name__)

ATTR = "kdsearch"  # the study user attribute holding kind, spec and search space
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
Objective = Callable[[optuna.Trial], float]


class StudyKind(abc.ABC):
    """One kind of study (grid, TPE, ablation, ...): its search space, how its trials are chosen, and
    what one trial computes.

    The engine in this module is given a kind and never names one; ``kdsearch.search.kinds`` collects them
    by name, and only the top (the CLI, a worker joining a stored study) looks one up there.
    """

    name: str  # stored with the study
    unit: str  # what ``total`` counts, for progress lines: "grid points"
    queue: bool = False  # True: each point is queued once and evaluated exactly once; False: trials are sampled
    directions: tuple[str, ...] = ("maximize",)  # the objective's values: validation accuracy first
    # Space lists that a resume may extend, and the study-file keys (in the kind's section) that set them.
    growing: Mapping[str, tuple[str, ...]] = {}
    # Space keys (set by the same-named study-file keys in the kind's section) that a resume may add to
    # a study stored without them, but never change: an ablation's gamma arrives with its first AT arm.
    set_once: tuple[str, ...] = ()

    def check_grown(self, study: optuna.Study, space: dict[str, Any]) -> None:
        """Raise a one-line error where the stored ``study`` cannot run its grown ``space`` (called before
        the space is stored); any study can, unless its kind says otherwise."""
        return None

    @abc.abstractmethod
    def validate(self, spec: StudySpec) -> None:
        """Raise a one-line error for anything wrong with ``spec``, before a study is written."""

    @abc.abstractmethod
    def space(self, spec: StudySpec) -> dict[str, Any]:
        """The search space stored with the study (plain JSON values)."""

    @abc.abstractmethod
    def total(self, space: dict[str, Any]) -> int:
        """How many points (or trials) the study runs in all."""

    def points(self, space: dict[str, Any]) -> list[dict[str, Any]]:
        """A queue kind's points, each the fixed params of one trial; a sampled kind's enqueued ones."""
        return []

    def algorithms(
        self, spec: StudySpec, joining: bool
    ) -> tuple[optuna.samplers.BaseSampler | None, optuna.pruners.BasePruner | None]:
        """(sampler, pruner); a queued kind never samples, so it keeps Optuna's defaults."""
        return None, None

    @abc.abstractmethod
    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        """Configs that bound what the trials need prepared (IG maps when some p > 0, cached logits)."""

    @abc.abstractmethod
    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        """The function that evaluates one trial of this study."""

    def budget_spent(self, study: optuna.Study, space: dict[str, Any], train_epochs: int) -> bool:
        """True once the study has spent a budget of its own, read from its stored ``space``: no new trial
        starts (queued ones still run), and a study that ended on it is complete."""
        return False

    def budget_line(self, study: optuna.Study, space: dict[str, Any], train_epochs: int) -> str | None:
        """One line on that budget for ``study status``, or None for a study without one."""
        return None

    def done(self, study: optuna.Study) -> int:
        """Points with a complete trial (queue kinds); sampled kinds count completed + pruned trials."""
        if not self.queue:
            return len(study.get_trials(deepcopy=False, states=FINISHED))
        return len({point_key(trial) for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))})

    @property
    def done_word(self) -> str:
        """What ``done`` counts, for progress lines: complete points, or finished (complete or pruned) trials."""
        return "complete" if self.queue else "finished"


# --- a study handle: what is stored, how far it got -----------------------------------------


@dataclass
class StudyHandle:
    study: optuna.Study
    storage: optuna.storages.BaseStorage  # a database, or the gRPC proxy in front of one
    spec: StudySpec
    kind: StudyKind
    space: dict[str, Any]  # grid: {t: [...], alpha: [...], p: [...]}; tpe: the TPE spec; ablation: arms × seeds
    total: int  # grid points, TPE trials, or arms × seeds
    heartbeat: HeartbeatConfig

    @property
    def name(self) -> str:
        return self.study.study_name

    def trials(self, states: Iterable[TrialState] | None = None) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=tuple(states) if states is not None else None)

    def counts(self) -> dict[str, int]:
        return state_counts(self.trials())

    def done(self) -> int:
        return self.kind.done(self.study)

    def running(self) -> int:
        return len(self.trials((TrialState.RUNNING,)))


def state_counts(trials: Iterable[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """Trials by state name, and DEFERRED: a deferred trial is failed only to take it out of the queue
    (``defer_queued``), so it is not counted as FAIL."""
    counts = Counter(DEFERRED.upper() if DEFERRED in trial.user_attrs else trial.state.name for trial in trials)
    return {name: counts.get(name, 0) for name in [state.name for state in TrialState] + [DEFERRED.upper()]}


def point_key(trial: optuna.trial.FrozenTrial) -> str:
    # A queued trial holds its point in fixed_params until the objective suggests it.
    return json.dumps(trial.system_attrs.get("fixed_params") or trial.params, sort_keys=True)


def study_identity(spec: StudySpec, kind: StudyKind, space: dict[str, Any]) -> str:
    """Hash of what the trials compute: the spec without machine-local settings, and the space.

    The kind's ``growing`` space keys, and the spec keys (in the kind's section) that set them, are
    left out, so adding members keeps the study.
    """
    source = json.loads(json.dumps(spec.source, default=str))
    for key in ("cache_dir", "device"):
        source.get("train", {}).pop(key, None)
    space = dict(space)
    for space_key, spec_keys in [*kind.growing.items(), *((key, (key,)) for key in kind.set_once)]:
        space.pop(space_key, None)
        for spec_key in spec_keys:
            source.get(kind.name, {}).pop(spec_key, None)
    return content_key({"kind": kind.name, "spec": source, "space": space})


@dataclass(frozen=True)
class StudyPlan:
    """A study as it is checked before anything is written: its kind, spec, search space and name."""

    kind: StudyKind
    spec: StudySpec
    space: dict[str, Any]
    identity: str
    name: str


def plan_study(kind: StudyKind, spec: StudySpec, study_name: str | None = None) -> StudyPlan:
    """Validate ``spec`` (and ``study_name``) for ``kind``, touching no storage: everything a bad input
    can be refused for, before a caller creates folders or stores."""
    if study_name is not None:
        check_study_name(study_name)
    kind.validate(spec)
    space = kind.space(spec)
    identity = study_identity(spec, kind, space)
    return StudyPlan(kind, spec, space, identity, study_name or f"{spec.name}-{kind.name}-{identity[:8]}")


def open_study(
    kind: StudyKind,
    spec: StudySpec,
    storage_url: str,
    heartbeat: HeartbeatConfig,
    study_name: str | None = None,
) -> StudyHandle:
    """Validate ``spec``, then create the study, or load it when the same spec and space made it
    before (a resume); a queue kind then queues every point without a complete, running or queued trial."""
    return open_planned(plan_study(kind, spec, study_name), storage_url, heartbeat)


def open_planned(plan: StudyPlan, storage_url: str, heartbeat: HeartbeatConfig) -> StudyHandle:
    """Create the study of ``plan`` (``plan_study``), or load it when the same spec and space made it before.

    Checks the storage first, so a bad URL creates nothing. A name that exists with another spec or
    space is an error rather than a silent mix of two experiments. The kind's ``growing`` lists (an
    ablation's arms and seeds) may differ: the study keeps the union of old and new members, so
    finished runs are kept and only new ones are added.
    """
    kind, spec, space, identity, name = plan.kind, plan.spec, plan.space, plan.identity, plan.name
    check_database(storage_url)
    sampler, pruner = kind.algorithms(spec, joining=False)
    storage = open_storage(storage_url, heartbeat)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=list(kind.directions),
        load_if_exists=True,
        sampler=sampler,
        pruner=pruner,
    )
    stored = study.user_attrs.get(ATTR)
    if stored is not None and stored["identity"] != identity:
        raise StudyError(
            f"study {name} already exists with a different {'spec or space' if stored['kind'] == kind.name else 'kind'}"
            f" ({stored['kind']}); pick another --study-name"
        )
    if stored is not None:
        space = _grown(kind, name, stored["space"], space)
        kind.check_grown(study, space)
    total = kind.total(space)
    if stored is None or stored["space"] != space:
        study.set_user_attr(
            ATTR, {"kind": kind.name, "identity": identity, "spec": spec.source, "space": space, "total": total}
        )
    handle = StudyHandle(study, storage, spec, kind, space, total, heartbeat)
    if kind.queue or kind.points(space):  # a sampled kind may also start with fixed points
        enqueue_missing(handle, kind.points(space))
    return handle


def _grown(kind: StudyKind, name: str, stored: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The union of a stored space's growing lists with the new ones, checking its set-once keys."""
    space = {**space}
    for key in kind.growing:
        space[key] = stored[key] + [item for item in space[key] if item not in stored[key]]
    for key in kind.set_once:
        if key in stored and space.get(key) != stored[key]:
            raise StudyError(
                f"study {name} ran with {kind.name} {key} {stored[key]}; give the same value (or another --study-name)"
            )
    return space


def stored_kind(study: optuna.Study) -> str:
    """The name of the kind that created ``study``."""
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        raise StudyError(f"study {study.study_name!r} was not created by kdsearch (no {ATTR!r} attribute)")
    return stored["kind"]


def join_study(
    study_name: str,
    storage_url: str,
    heartbeat: HeartbeatConfig,
    kinds: Mapping[str, StudyKind],
    overrides: dict[str, Any] | None = None,
    wait_s: float = 0.0,
) -> StudyHandle:
    """Load an existing study as a worker; ``kinds`` maps stored kind names to kinds (``kdsearch.search.kinds``),
    ``overrides`` (e.g. train.cache_dir) adapt the stored spec to this machine.

    ``wait_s``: how long to wait for the study to be created by another process (compose starts the
    workers and the creating command together).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_database(storage_url, must_exist=True, writes=True)
            storage = open_storage(storage_url, heartbeat)
            names = optuna.get_all_study_names(storage)
            if study_name in names:
                break
            raise StudyError(f"no study {study_name!r} in {storage_url}; studies there: {names}")
        except StudyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)
    study = optuna.load_study(study_name=study_name, storage=storage)
    kind = kinds[stored_kind(study)]
    stored = study.user_attrs[ATTR]
    spec = build_spec(apply_overrides(stored["spec"], overrides or {}))
    sampler, pruner = kind.algorithms(spec, joining=True)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    return StudyHandle(study, storage, spec, kind, stored["space"], stored["total"], heartbeat)


def find_study(storage_url: str, study_name: str | None) -> optuna.Study:
    """The named study, or the only one in the storage; for status and best."""
    check_database(storage_url, must_exist=True)
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise StudyError(f"{len(names)} studies in {storage_url}; name one with --study-name: {names}")
        study_name = names[0]
    if study_name not in names:
        raise StudyError(f"no study {study_name!r} in {storage_url}; studies there: {names}")
    return optuna.load_study(study_name=study_name, storage=storage)


def enqueue_missing(handle: StudyHandle, points: list[dict[str, Any]]) -> int:
    """Queue the points without a decided or live trial (failed ones are queued again); returns how many.
    A pruned point is decided: running it again would only be pruned again."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    covered = {point_key(trial) for trial in handle.trials(live)}
    missing = [point for point in points if json.dumps(point, sort_keys=True) not in covered]
    for point in missing:
        handle.study.enqueue_trial(point)
    return len(missing)


DEFERRED = "deferred"  # user attribute of a queued trial taken out of the queue: why
FAIL_REASON = "fail_reason"  # user attribute of a trial failed by kdsearch (its training diverged): why
PRUNE_REASON = "prune_reason"  # user attribute of a pruned trial: why (a pruner, or a Pareto latency constraint)


def defer_queued(storage_url: str, study_name: str | None, where: Mapping[str, list[Any]], reason: str) -> list[dict]:
    """Take the queued trials whose point matches ``where`` (each key one of its listed values) out of
    the queue, recording ``reason``; returns their points. Checks everything before changing anything.

    Optuna cannot dequeue, so each trial is claimed as a worker claims one (a trial a worker took
    meanwhile is left running) and failed with the reason in its ``deferred`` user attribute. Workers
    (``study worker``) then leave the point out; running the study's own command again (``ablate``,
    ``study grid``) queues it again, as it does any failed point.
    """
    if not reason.strip():
        raise ConfigError("say why the trials are deferred (--reason)")
    study = find_study(storage_url, study_name)
    trials = study.get_trials(deepcopy=False)
    keys = {key for trial in trials for key in json.loads(point_key(trial))}
    unknown = sorted(set(where) - keys)
    if not where or unknown:
        raise ConfigError(
            f"study {study.study_name}'s points have {sorted(keys)}; match on those"
            + (f" (not {', '.join(unknown)})" if unknown else "")
        )
    matched = [
        trial
        for trial in trials
        if trial.state == TrialState.WAITING
        and all(json.loads(point_key(trial)).get(key) in values for key, values in where.items())
    ]
    if not matched:
        raise StudyError(f"no queued trial of study {study.study_name} matches {dict(where)}")
    storage = open_storage(storage_url)
    study_id = storage.get_study_id_from_name(study.study_name)
    deferred = []
    for trial in matched:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if not _take(storage, trial_id):
            continue  # a worker took it since we listed the queue
        storage.set_trial_user_attr(trial_id, DEFERRED, reason)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        deferred.append(json.loads(point_key(trial)))
    return deferred


def outstanding_deferred(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The latest deferral of each point that has not been queued again or run since."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    covered = {point_key(trial) for trial in study.get_trials(deepcopy=False, states=live)}
    latest = {}  # a point deferred, queued again and deferred again counts once, with its last reason
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if DEFERRED in trial.user_attrs and point_key(trial) not in covered:
            latest[point_key(trial)] = trial
    return sorted(latest.values(), key=lambda trial: trial.number)


# --- the worker loop --------------------------------------------------------------------------


def claim_waiting(handle: StudyHandle) -> optuna.Trial | None:
    """Atomically take one queued trial (WAITING → RUNNING); None when the queue is empty."""
    storage, study = handle.storage, handle.study
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        # The heartbeat before the take: a trial this worker takes then has one even if the worker dies (or
        # the storage fails) right after, so it goes stale and is retried. A RUNNING trial without any
        # heartbeat never goes stale, and every worker would wait for it for ever (seen in
        # bench/load_faults.py when PostgreSQL restarted between a take and its heartbeat).
        try:
            storage.record_heartbeat(trial_id)
        except optuna.exceptions.StorageInternalError:
            continue  # a trial's first heartbeat is a row of its own: another worker is writing it, taking it now
        if _take(storage, trial_id):
            return optuna.Trial(study, trial_id)
    return None


def _take(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """WAITING → RUNNING, atomic in the storage; False when another process took the trial first."""
    try:
        return storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # taken and finished since the queue was listed


def next_trial(handle: StudyHandle) -> optuna.Trial | None:
    """The next trial this worker should run, or None when there is nothing left to start."""
    claimed = claim_waiting(handle)  # queued points, and retries of trials whose worker died
    if claimed is not None or handle.kind.queue:
        return claimed
    started = len(handle.trials((*FINISHED, TrialState.RUNNING)))
    # Two workers may both pass this check for the last trial; TPE then runs one trial too many.
    if started >= handle.total or handle.kind.budget_spent(handle.study, handle.space, handle.spec.train.epochs):
        return None
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; run_trials sends them itself.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return handle.study.ask()


class _Heartbeat:
    """Records the trial's heartbeat every interval while the trial runs (as Study.optimize would)."""

    def __init__(self, handle: StudyHandle, trial: optuna.Trial):
        self.storage, self.interval = handle.storage, handle.heartbeat.interval
        study_id = self.storage.get_study_id_from_name(handle.name)
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as error:  # the storage restarting, a network blip: the next beat may get through
                log.warning("trial heartbeat not recorded (%s); next try in %d s", type(error).__name__, self.interval)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _tell(handle: StudyHandle, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None):
    try:
        failed_meanwhile = handle.study.tell(trial, value, state=state, skip_if_finished=True).state == TrialState.FAIL
    except optuna.exceptions.UpdateFinishedTrialError:
        failed_meanwhile = True  # it was failed between tell's look at its state and tell's write
    if failed_meanwhile and state != TrialState.FAIL:
        # Its heartbeats stopped for longer than the grace period (a stalled machine), so another worker
        # failed it and queued a retry: the retry's result is the one that counts.
        log.warning("trial %d was failed by another worker meanwhile; its retry will be evaluated", trial.number)


def _fail_stale(handle: StudyHandle) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(handle.study)


@dataclass
class RunSummary:
    ran: int  # trials this process evaluated
    done: int  # points (or TPE trials) complete in the study now
    total: int
    counts: dict[str, int]
    best: optuna.trial.FrozenTrial | None
    parent_run: str | None  # the tracking parent run, None when nothing had to run
    # Why none of the trials this process ran completed, e.g. "2 pruned (trial 1: 3.10 ms > max_latency_ms
    # 1.0: not trained)"; None when one did, or none ran.
    none_completed: str | None = None


def run_trials(
    handle: StudyHandle,
    objective: Callable[[optuna.Trial], float],
    progress: bool = True,
    max_trials: int | None = None,
) -> list[int]:
    """Evaluate trials until none is left to start and no other worker's trial is running; returns the
    numbers of the trials this process evaluated.

    Waiting for running trials matters: if their worker dies, their retry is queued only after the
    grace period, and someone must be there to run it. A trial whose training diverged (NaN loss) is
    failed with the reason and the worker goes on; any other failing objective fails its trial and
    stops this worker with the error (a re-run queues the point again), except a failing storage or
    tracking server, whose trial is left to go stale and be retried.
    """
    from tqdm import tqdm

    ran, waiting_said = [], False
    with tqdm(total=handle.total, initial=handle.done(), desc=handle.name, unit="trial", disable=not progress) as bar:
        while max_trials is None or len(ran) < max_trials:
            _fail_stale(handle)
            trial = next_trial(handle)
            if trial is None:
                # Queued trials left are ones other workers were taking as this one tried: look again.
                if handle.running() == 0 and not handle.trials((TrialState.WAITING,)):
                    break
                if not waiting_said:
                    log.warning(
                        "waiting for %d running trial(s): another worker's, or a killed run's, which is failed and "
                        "queued again once it has sent no heartbeat for %d s",
                        handle.running(),
                        handle.heartbeat.grace,
                    )
                    waiting_said = True
                time.sleep(handle.heartbeat.interval)
                continue
            waiting_said = False
            with _Heartbeat(handle, trial):
                try:
                    value = objective(trial)
                except optuna.TrialPruned as pruned:
                    if str(pruned):
                        trial.set_user_attr(PRUNE_REASON, str(pruned))
                    _tell(handle, trial, state=TrialState.PRUNED)
                except TrainingDiverged as error:
                    trial.set_user_attr(FAIL_REASON, str(error))
                    _tell(handle, trial, state=TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, error)
                except BaseException as error:
                    # A storage or tracking server that failed (a database restart under set_user_attr, a
                    # request that got no answer) leaves the trial RUNNING: it goes stale and is queued again,
                    # as a dead worker's. FAIL would lose its point until the study's command is run again
                    # (both seen in bench/load_faults.py).
                    if not (storage_failed(error) or tracking_failed(error)):
                        _tell(handle, trial, state=TrialState.FAIL)
                    raise
                else:
                    _tell(handle, trial, value)
            ran.append(trial.number)
            if progress:  # counting the study's complete points reads every trial: not for a hidden bar
                bar.n = handle.done()
                bar.refresh()
    return ran


def run_study(
    handle: StudyHandle,
    tracker: Tracker,
    experiment: str | None = None,
    progress: bool = True,
    max_trials: int | None = None,
    checkpoint_root: Path | None = None,
) -> RunSummary:
    """Prepare once, then run the study's remaining trials as nested runs of the study's parent run.

    With ``checkpoint_root``, trials write per-epoch checkpoints there, and a trial retried after its
    worker died continues from the last one.
    """
    if handle.done() < handle.total:
        prepared = prepare(handle.spec, handle.kind.trial_configs(handle.spec, handle.space), progress)
        experiment = experiment or handle.spec.name
        parent = parent_run(handle, tracker, experiment, prepared)
        runner = TrialRunner(prepared, tracker, experiment, parent, progress, checkpoint_root)
        ran = run_trials(handle, handle.kind.objective(handle, runner), progress, max_trials)
        finish_parent(handle, tracker, parent)
        _remove_empty_checkpoint_folders(handle, checkpoint_root)
        return summarize(handle, ran, parent)
    return summarize(handle, [], None)


def _remove_empty_checkpoint_folders(handle: StudyHandle, checkpoint_root: Path | None) -> None:
    """Trials remove their checkpoints when they end; once the study is done, their empty folders go too."""
    if checkpoint_root is None or handle.done() < handle.total or handle.running() > 0:
        return
    for folder in (checkpoint_root / handle.name, checkpoint_root):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def parent_run(handle: StudyHandle, tracker: Tracker, experiment: str, prepared: Prepared) -> str:
    tags = {**run_tags(prepared.device), "kdsearch.kind": handle.kind.name, "optuna.study": handle.name}
    run_id = tracker.parent_run(experiment, handle.name, handle.name, tags)
    tracker.log_metrics(run_id, prepared.teacher_metrics)
    tracker.log_dict(
        run_id, {"kind": handle.kind.name, "space": handle.space, "spec": handle.spec.source}, "study.json"
    )
    return run_id


def finish_parent(handle: StudyHandle, tracker: Tracker, parent: str) -> None:
    """Record the best trial on the parent run and close it once the whole study is done."""
    best = best_trial(handle.study)
    if best is not None:
        tracker.log_metrics(parent, {"best_val_acc": best.values[0], "best_test_acc": best.user_attrs["test_acc"]})
        tracker.set_tags(parent, {"best_trial": str(best.number), "best_params": json.dumps(best.params)})
    if handle.done() >= handle.total and handle.running() == 0:
        tracker.end_run(parent)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial of highest validation accuracy (the first objective of a multi-objective study)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda trial: trial.values[0]) if complete else None


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """A multi-objective study's Pareto-optimal complete trials (feasible ones, with constraints), by
    accuracy; a single-objective study's best trial."""
    if len(study.directions) == 1:
        best = best_trial(study)
        return [best] if best is not None else []
    return sorted(study.best_trials, key=lambda trial: -trial.values[0])


def fastest_within(study: optuna.Study, points: float) -> optuna.trial.FrozenTrial | None:
    """A Pareto study's pick for deployment: the fastest trial of its front whose validation accuracy is
    within ``points`` of the front's best (0: the most accurate one). None before a trial completed."""
    trials = front(study)
    if not trials:
        return None
    eligible = [trial for trial in trials if trial.values[0] >= trials[0].values[0] - points]
    return min(eligible, key=lambda trial: trial.values[1])


def summarize(handle: StudyHandle, ran: list[int], parent: str | None) -> RunSummary:
    """The study now, and what became of the trials ``ran`` (their numbers) that this process evaluated."""
    trials, numbers = handle.trials(), set(ran)
    mine = [trial for trial in trials if trial.number in numbers]
    none_completed = None
    if mine and all(trial.state != TrialState.COMPLETE for trial in mine):
        none_completed = why_not_complete(mine)
    return RunSummary(
        len(ran), handle.done(), handle.total, state_counts(trials), best_trial(handle.study), parent, none_completed
    )


def why_not_complete(trials: list[optuna.trial.FrozenTrial]) -> str:
    """How trials that did not complete ended, with the last reason recorded: "2 failed (trial 3: ...)"."""
    counts = Counter("failed" if trial.state == TrialState.FAIL else trial.state.name.lower() for trial in trials)
    text = ", ".join(f"{count} {state}" for state, count in counts.items())
    reasons = [
        (trial.number, trial.user_attrs.get(FAIL_REASON) or trial.user_attrs.get(PRUNE_REASON)) for trial in trials
    ]
    explained = [(number, reason) for number, reason in reasons if reason]
    if explained:
        number, reason = explained[-1]
        text += f" (trial {number}: {reason})"
    return text


def describe_progress(handle: StudyHandle) -> str:
    """ "8 of 12 grid points already complete; 4 to run" — said before a run starts."""
    unit, word = handle.kind.unit, handle.kind.done_word
    done = handle.done()
    if done >= handle.total:
        return f"{done} of {handle.total} {unit} already {word}; nothing to run"
    return f"{done} of {handle.total} {unit} already {word}; {handle.total - done} to run"


def status(study: optuna.Study, kind: StudyKind) -> dict[str, Any]:
    """Counts by state, progress and the best trial so far, as plain values (the CLI prints them)."""
    stored = study.user_attrs.get(ATTR, {})
    best = best_trial(study)
    return {
        "study": study.study_name,
        "kind": kind.name,
        "total": stored.get("total"),
        "done": kind.done(study),
        "states": state_counts(study.get_trials(deepcopy=False)),
        "deferred": [
            {"trial": trial.number, "point": json.loads(point_key(trial)), "reason": trial.user_attrs[DEFERRED]}
            for trial in outstanding_deferred(study)
        ],
        "best": describe_trial(best) if best is not None else None,
        "front": [describe_trial(trial) for trial in front(study)] if len(study.directions) > 1 else None,
        "rungs": rung_progress(study.get_trials(deepcopy=False)),
        "budget": kind.budget_line(study, stored.get("space", {}), stored_train_epochs(stored.get("spec", {}))),
    }


def stored_train_epochs(source: dict[str, Any]) -> int:
    """``train.epochs`` of a stored study's spec source, without building the spec (which can need the
    data: a trained teacher's file is named by it)."""
    return int(source.get("train", {}).get("epochs", TrainConfig.epochs))


def rung_progress(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]] | None:
    """Each multi-fidelity candidate's validation accuracy at the end of every rung it reached, and the
    rung after which it was stopped (None: it went on, or is still running); None for other studies."""
    rows = []
    for trial in trials:
        reached = rung_accuracies(trial.user_attrs)
        if reached:
            rows.append(
                {
                    "trial": trial.number,
                    "state": trial.state.name.lower(),
                    "val_acc_after_epochs": reached,
                    "stopped_at": trial.user_attrs.get("stopped_at"),
                }
            )
    return rows or None


def describe_trial(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    described = {
        "trial": trial.number,
        "val_acc": trial.values[0],
        "test_acc": trial.user_attrs.get("test_acc"),
        "params": trial.params,
        "run_id": trial.user_attrs.get("run_id"),
    }
    if len(trial.values) > 1:
        described["latency_ms"] = trial.values[1]
    if "same_as_trial" in trial.user_attrs:  # a Pareto point proposed again: its twin's student
        described["same_as_trial"] = trial.user_attrs["same_as_trial"]
    return described
