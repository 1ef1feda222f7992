"""What the trials of a study share (data, teacher, caches, the teacher's costs), prepared once per
process, and one trial trained with MLflow tracking: a nested run with params, per-epoch and final
metrics, the config and the student checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from kdsearch.config import LatencyConfig, ModelConfig, TeacherLogits, TrainConfig, flatten, replace, to_dict
from kdsearch.data.datasets import Splits, load_splits
from kdsearch.distill.teacher import cached_teacher_accuracy, trained_teacher_fields
from kdsearch.distill.train import TrainInputs, TrainResult, prepare_inputs, train
from kdsearch.infra.device import resolve_device, resolve_precision
from kdsearch.infra.tensor_cache import TensorCache, content_key
from kdsearch.models.classifiers import CifarClassifier, save_checkpoint
from kdsearch.runtime.costs import model_costs
from kdsearch.runtime.timing import CALIBRATION_IMAGES
from kdsearch.search.studyfile import StudySpec, teacher_recipe_config
from kdsearch.track.tracking import Tracker, run_tags

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> tag

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything computed once per process before the first trial and reused by all of them."""

    inputs: TrainInputs  # data, teacher, attribution maps and cached logits, as every trial's train() reads them
    device: torch.device
    teacher_metrics: dict[str, float]
    latency: LatencyConfig
    cache_dir: str  # where ONNX latencies are cached per architecture
    _student_costs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def splits(self) -> Splits:
        return self.inputs.splits

    def student_metrics(self, model: CifarClassifier, architecture: ModelConfig) -> dict[str, float]:
        """Parameters, FLOPs and latency of a student architecture, measured once per architecture."""
        key = json.dumps(to_dict(architecture), sort_keys=True)
        if key not in self._student_costs:
            calibration = self.splits.train_images[:CALIBRATION_IMAGES]
            costs = model_costs(model, architecture, "student", calibration, self.device, self.latency, self.cache_dir)
            self._student_costs[key] = costs
        costs = dict(self._student_costs[key])
        costs["compression_factor"] = self.teacher_metrics["teacher_params"] / costs["student_params"]
        return costs


def ensure_teacher(spec: StudySpec, splits: Splits, progress: bool) -> None:
    """Train the study's teacher when its spec gives a recipe and no process has cached it yet."""
    if spec.teacher.train is None:
        return
    recipe = teacher_recipe_config(spec.teacher, spec.train)

    def build(scratch: Path):
        log.info("training the study's teacher (%d epochs); cached for every later trial", recipe.epochs)
        result = train(recipe, inputs=TrainInputs(splits), progress=progress)
        state = {name: tensor.detach().cpu() for name, tensor in result.model.state_dict().items()}
        return state, {"test_acc": result.test_acc, "val_acc": result.val_acc}

    TensorCache(spec.train.cache_dir).get_or_build("teacher", trained_teacher_fields(recipe), build)


def prepare(spec: StudySpec, configs: list[TrainConfig], progress: bool = True) -> Prepared:
    """Decode the data, get the teacher, fill the map caches (of every overlay method the trials use) and
    the teacher-logit cache, measure the teacher."""
    base = spec.train
    device = resolve_device(base.device)
    splits = load_splits(base.data, base.cache_dir)
    ensure_teacher(spec, splits, progress)
    inputs = prepare_inputs(
        base,
        progress,
        splits,
        methods=sorted({config.overlay.method for config in configs if config.overlay.p > 0}),
        logits=any(config.kd.alpha > 0 and config.kd.teacher_logits == TeacherLogits.CACHED for config in configs),
        teacher=True,
        runs=configs,
    )
    teacher_architecture = replace(base.teacher, num_classes=splits.num_classes)
    metrics = {
        # fp32, like `kdsearch eval`: the teacher's accuracy should not depend on the autocast.
        "teacher_test_acc": cached_teacher_accuracy(inputs.teacher, splits, base.cache_dir, device),
        **model_costs(
            inputs.teacher,
            teacher_architecture,
            "teacher",
            splits.train_images[:CALIBRATION_IMAGES],
            device,
            spec.latency,
            base.cache_dir,
        ),
    }
    return Prepared(inputs, device, metrics, spec.latency, base.cache_dir)


# --- one tracked trial ------------------------------------------------------------------------


@dataclass
class TrialRunner:
    """Trains one trial's config with tracking: a nested run with params, per-epoch and final metrics."""

    prepared: Prepared
    tracker: Tracker
    experiment: str
    parent_run: str
    progress: bool = True
    # Per-epoch checkpoints of running trials, one directory per study and point: a trial retried
    # after its worker died (on this machine) continues from its last epoch instead of from scratch.
    checkpoint_root: Path | None = None

    def checkpoint_dir(self, trial: optuna.Trial) -> Path | None:
        if self.checkpoint_root is None:
            return None
        point = content_key({"study": trial.study.study_name, "params": trial.params})
        return self.checkpoint_root / trial.study.study_name / point

    def params(self, config: TrainConfig) -> dict[str, Any]:
        splits = self.prepared.splits
        sizes = splits.sizes()
        method = config.overlay.method if config.overlay.p > 0 else None
        key = self.prepared.inputs.map_keys.get(method, "none")
        return {
            **flatten(config),
            "data.name": splits.label,
            "data.train_images": sizes["train"],
            "data.val_images": sizes["val"],
            "data.test_images": sizes["test"],
            "teacher_hash": self.prepared.inputs.teacher_hash,
            # As runs logged it before other methods existed; their maps' key is attribution_cache_key.
            "ig_cache_key": key if method == "integrated_gradients" else "none",
            **({"attribution_cache_key": key} if method not in (None, "integrated_gradients") else {}),
        }

    def train(
        self,
        trial: optuna.Trial,
        config: TrainConfig,
        *,
        run_name: str | None = None,
        extra_params: dict[str, Any] | None = None,
        prune: bool = False,
        evaluate: Callable[[TrainResult], dict[str, float]] | None = None,
        after_epoch: Callable[[int, dict], None] | None = None,
    ) -> TrainResult:
        """Train ``config`` as ``trial``; raises optuna.TrialPruned to prune.

        ``evaluate(result)`` adds metrics after training (the ablation's explanation agreement);
        ``after_epoch(epoch, row)`` runs after each epoch's metrics are logged and may raise TrialPruned
        (the Pareto study's rungs).
        """
        run_id = self._start_run(trial, config, run_name, extra_params)
        run_dir = self.checkpoint_dir(trial)
        try:
            result, metrics, extra = self._train_tracked(trial, config, run_id, run_dir, prune, evaluate, after_epoch)
        except optuna.TrialPruned:
            self.tracker.set_tags(run_id, {"kdsearch.state": "PRUNED"})
            self.tracker.end_run(run_id, "KILLED")
            _remove(run_dir)
            raise
        except BaseException:
            self.tracker.end_run(run_id, "FAILED")
            raise
        # On the trial too, so `study status`, `study best` and the ablation table need no tracking store.
        for key in ("test_acc", "train_time_s", *extra):
            trial.set_user_attr(key, metrics[key])
        self.tracker.end_run(run_id)
        _remove(run_dir)  # the student is an MLflow artefact now
        return result

    def _start_run(
        self, trial: optuna.Trial, config: TrainConfig, run_name: str | None, extra_params: dict[str, Any] | None
    ) -> str:
        failed = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
        if failed:  # a retry of trials whose workers died
            self._close_dead_runs([str(number) for number in failed])
        tags = {
            **run_tags(self.prepared.device),
            "optuna.study": trial.study.study_name,
            "optuna.trial": str(trial.number),
            # precision "auto" differs between machines (bf16 only where the CPU runs it natively).
            "precision_resolved": PRECISION_NAMES[resolve_precision(config.precision, self.prepared.device)],
        }
        run_id = self.tracker.start_run(self.experiment, run_name or f"trial-{trial.number}", self.parent_run, tags)
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.tracker.log_params(run_id, {**self.params(config), "optuna.trial": trial.number, **(extra_params or {})})
        return run_id

    def _train_tracked(
        self,
        trial: optuna.Trial,
        config: TrainConfig,
        run_id: str,
        run_dir: Path | None,
        prune: bool,
        evaluate: Callable[[TrainResult], dict[str, float]] | None,
        after_epoch: Callable[[int, dict], None] | None = None,
    ) -> tuple[TrainResult, dict[str, float], dict[str, float]]:
        """Train with per-epoch metrics (and pruning), then log the final metrics and the student."""
        logged: set[int] = set()

        def log_epoch(row: dict) -> None:
            self.tracker.log_metrics(
                run_id, {"train_loss": row["train_loss"], "val_acc": row["val_acc"]}, step=row["epoch"]
            )
            logged.add(row["epoch"])

        def on_epoch(epoch: int, row: dict) -> None:
            log_epoch(row)
            if after_epoch is not None:
                after_epoch(epoch, row)
            if prune:
                trial.report(row["val_acc"], epoch + 1)
                # After the last epoch there is nothing left to save: the trial completes with its value.
                if epoch + 1 < config.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"val_acc {row['val_acc']:.2f} at epoch {epoch + 1}")

        result = train(
            config,
            inputs=self.prepared.inputs,
            run_dir=run_dir,
            resume=run_dir is not None,
            discard_foreign_checkpoint=True,
            on_epoch=on_epoch,
            progress=self.progress,
        )
        for row in result.history:  # epochs restored from a dead worker's checkpoint
            if row["epoch"] not in logged:
                log_epoch(row)
        extra = evaluate(result) if evaluate is not None else {}
        metrics = {
            "test_acc": result.test_acc,
            "train_time_s": result.train_time_s,
            "setup_time_s": result.setup_time_s,
            "images_per_s": result.images_per_s,
            **self.prepared.teacher_metrics,
            **self.prepared.student_metrics(result.model, result.model_config),
            **extra,
        }
        self.tracker.log_metrics(run_id, metrics, step=result.epochs_completed)
        self._log_artifacts(run_id, config, result)
        return result, metrics, extra

    def _close_dead_runs(self, trial_numbers: list[str]) -> None:
        """Close as FAILED the runs the failed trials left RUNNING. Found by their trial tag, not the trial's
        run_id: a worker killed (or failing on a storage call) between creating its run and recording it on
        the trial left none."""
        try:
            for run_id in self.tracker.running_children(self.parent_run, "optuna.trial", trial_numbers):
                self.tracker.set_tags(run_id, {"kdsearch.state": "WORKER_DIED"})
                self.tracker.end_run(run_id, "FAILED")
        except Exception as error:  # best effort: the runs may live in another worker's tracking store
            log.warning(
                "could not close the runs of trials %s, whose workers died: %s", ", ".join(trial_numbers), error
            )

    def _log_artifacts(self, run_id: str, config: TrainConfig, result: TrainResult) -> None:
        self.tracker.log_dict(run_id, to_dict(config), "config.json")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.pt"
            save_checkpoint(result.model, result.model_config, path, extra={"train_config": to_dict(config)})
            self.tracker.log_artifact(run_id, path)


def _remove(run_dir: Path | None) -> None:
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
