"""A trained student as it ships: ONNX (and int8) files checked against PyTorch, timed, described in a
model card and logged to MLflow as a logged model.

    kdsearch export --study smoke-grid-1a2b3c4d --int8 --out exports/smoke --workdir runs/smoke

The student comes from a study trial's MLflow run (artefacts ``model.pt`` and ``config.json``) or from a
run named by id. The fp32 ONNX model must agree with the PyTorch student on the top-1 class of at least
``min_agreement`` % of the test set, or nothing is kept. Every file is written into a temporary
directory beside ``out`` and renamed to ``out`` at the end, so a failure leaves no half-written export.

MLflow: each export is a new run nested under the student's training run (role ``export``), so the
training record is left as it was and every export (machine, int8 or not) is its own record. That run
holds the parity and latency metrics, the model card and the int8 file; the fp32 model is logged under
it with ``mlflow.onnx.log_model`` as a logged model carrying the training run's params.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from kdsearch.config import ExportFormat, Runtime, TrainConfig, choice, from_dict, replace
from kdsearch.errors import CheckpointError, ConfigError, StudyError
from kdsearch.infra.storage import check_writable
from kdsearch.track.tracking import ROLE_TAG, MlflowTracker, TrackingError, mlflow_client, run_tags

MODEL, INT8, CARD, SUMMARY = "model.onnx", "model.int8.onnx", "MODEL_CARD.md", "export.json"


@dataclass(frozen=True)
class ExportConfig:
    out: Path  # the export directory: absent or empty; written only when everything succeeded
    tracking_uri: str
    storage: str | None = None  # Optuna storage URL; needed with ``study``
    study: str | None = None  # a study's name: export its best trial, or ``trial``
    trial: int | None = None  # a trial number of ``study``; a multi-objective study needs it or ``within``
    within: float | None = None  # a Pareto study: its front's fastest student within this many points of the best
    run_id: str | None = None  # instead of a study: the MLflow run that trained the student
    format: str = "onnx"  # an ExportFormat
    int8: bool = False  # also a static int8 model, calibrated on training images
    register: str | None = None  # register the logged model under this name in the model registry
    data_dir: str | None = None  # this machine's data folder; default: the run's config
    cache_dir: str | None = None  # this machine's cache; default: the run's config
    min_agreement: float = 99.9  # % of test images on which ONNX fp32 and PyTorch must pick the same class
    calibration_images: int = 400  # training images for the int8 calibration (seeded random subset)
    batch_sizes: tuple[int, ...] = (1, 128)
    threads: int = 1  # ONNX Runtime intra-op threads of the timings
    warmup: int = 3  # untimed runs before each timing
    repeats: int = 10  # timed runs; the median is reported
    command: str | None = None  # the command line that made the export, for the model card

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "format", choice("format", self.format, ExportFormat))
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if (self.study is None) == (self.run_id is None):
            raise ConfigError("give exactly one of --study NAME or --run-id ID")
        if self.trial is not None and self.study is None:
            raise ConfigError("--trial selects a trial of --study; a --run-id names the run itself")
        if self.within is not None and (self.study is None or self.trial is not None):
            raise ConfigError("--within picks a trial of a Pareto --study; give it without --trial or --run-id")
        if self.within is not None and not 0 <= self.within <= 100:
            raise ConfigError(f"--within must be in [0, 100] points but got {self.within}")
        if self.trial is not None and self.trial < 0:
            raise ConfigError(f"--trial must be >= 0 but got {self.trial}")
        if self.study is not None and self.storage is None:
            raise ConfigError("--study needs a study storage (--storage)")
        if self.register is not None and not self.register.strip():
            raise ConfigError("--register needs a model name")
        if self.register is not None:
            _check_model_name(self.register)
        if not 0 <= self.min_agreement <= 100:
            raise ConfigError(f"min_agreement must be in [0, 100] but got {self.min_agreement}")
        for name in ("calibration_images", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 but got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0 but got {self.warmup}")
        if not self.batch_sizes or any(size < 1 for size in self.batch_sizes):
            raise ConfigError(f"batch_sizes must be positive but got {list(self.batch_sizes)}")
        if self.out.is_file():
            raise ConfigError(f"--out {self.out} is a file; give a directory")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ConfigError(f"--out {self.out} already exists and is not empty; give a new directory")
        check_writable(self.out, "--out")  # the export is staged beside it and renamed at the end


def _check_model_name(name: str) -> None:
    """A name MLflow's model registry takes, checked by MLflow's own rule: the registry refuses others
    only when the export is logged, after the export's work, leaving a FAILED run behind."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as error:
        raise ConfigError(f"--register {name!r}: {error.message}") from None


@dataclass(frozen=True)
class Source:
    """Where the student comes from: its training run and, when known, its study trial."""

    run_id: str
    experiment_id: str
    run_params: dict[str, str]  # the training run's MLflow params (the flattened TrainConfig, data.name, ...)
    study: str | None
    kind: str | None  # the study's kind: grid, tpe, ablation, pareto
    trial: int | None
    trial_params: dict[str, Any] | None  # the Optuna trial's params
    val_acc: float | None
    best: bool  # chosen as the study's best trial (no --trial)


# --- finding the student -----------------------------------------------------------------------


def find_source(config: ExportConfig, client) -> Source:
    """The training run of the chosen trial (or of ``run_id``); one-line errors for anything missing."""
    if config.study is not None:
        study, trial, best = _chosen_trial(config)
        run_id = trial.user_attrs.get("run_id")
        if run_id is None:
            raise StudyError(f"trial {trial.number} of study {study.study_name!r} has no MLflow run (no run_id)")
    else:
        run_id, study, trial, best = config.run_id, None, None, False
    run = _run(client, run_id, config.tracking_uri)
    names = {artifact.path for artifact in client.list_artifacts(run_id)}
    missing = sorted({"model.pt", "config.json"} - names)
    if missing:
        raise CheckpointError(
            f"MLflow run {run_id} has no {' or '.join(missing)}: only a completed trial's run holds its student"
        )
    if study is None:
        study, trial = _trial_of_run(config.storage, run.data.tags.get("optuna.study"), run_id)
    stored = study.user_attrs.get("kdsearch", {}) if study is not None else {}
    return Source(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        run_params=dict(run.data.params),
        study=study.study_name if study is not None else run.data.tags.get("optuna.study"),
        kind=stored.get("kind"),
        trial=trial.number if trial is not None else _int_or_none(run.data.tags.get("optuna.trial")),
        trial_params=dict(trial.params) if trial is not None else None,
        val_acc=trial.values[0] if trial is not None else run.data.metrics.get("val_acc"),
        best=best,
    )


def _chosen_trial(config: ExportConfig):
    from kdsearch.search.study import best_trial, fastest_within, find_study, front

    study = find_study(config.storage, config.study)
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    if config.within is not None and len(study.directions) == 1:
        raise StudyError(f"study {config.study!r} has one objective: --within is for a Pareto study")
    if config.within is not None:
        picked = fastest_within(study, config.within)
        if picked is None:
            raise StudyError(f"study {config.study!r} has no complete trial yet")
        return study, picked, False
    if config.trial is None:
        if len(study.directions) > 1:
            numbers = [trial.number for trial in front(study)]
            raise StudyError(
                f"study {config.study!r} has {len(study.directions)} objectives: choose a trial with --trial, or "
                f"--within POINTS for the fastest of its front within POINTS of the best accuracy (its Pareto "
                f"front: trials {numbers})"
            )
        best = best_trial(study)
        if best is None:
            raise StudyError(f"study {config.study!r} has no complete trial yet")
        return study, best, True
    trial = trials.get(config.trial)
    if trial is None:
        raise StudyError(f"study {config.study!r} has no trial {config.trial}; its trials: {sorted(trials)}")
    if trial.state != TrialState.COMPLETE:
        raise StudyError(
            f"trial {config.trial} of study {config.study!r} is {trial.state.name}, not COMPLETE: "
            "only a complete trial has a trained student"
        )
    return study, trial, False


def _run(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run {run_id!r} in {uri}") from None


def _trial_of_run(storage: str | None, study_name: str | None, run_id: str):
    """(study, trial) that trained ``run_id`` when ``storage`` holds its study, else (None, None)."""
    from kdsearch.search.study import find_study

    if storage is None or study_name is None:
        return None, None
    try:
        study = find_study(storage, study_name)
    except StudyError:  # the run's study lives elsewhere: the card names it without its params
        return None, None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("run_id") == run_id:
            return study, trial
    return study, None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for every download, even of one small file."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --- the export --------------------------------------------------------------------------------


def export(config: ExportConfig) -> dict[str, Any]:
    """Export the student of ``config``'s trial or run; returns the summary (also ``out/export.json``).

    Raises a one-line KdsearchError for bad input, for a failed parity check (fp32 top-1 agreement
    below ``min_agreement``) and for a tracking store that cannot be written; ``out`` is then not created.
    """
    from kdsearch.data.datasets import load_splits
    from kdsearch.models.classifiers import load_model

    client = mlflow_client(config.tracking_uri)
    source = find_source(config, client)
    with tempfile.TemporaryDirectory(prefix="kdsearch-export-") as scratch, _quiet_downloads():
        model_path = client.download_artifacts(source.run_id, "model.pt", scratch)
        train_config = from_dict(
            TrainConfig, json.loads(Path(client.download_artifacts(source.run_id, "config.json", scratch)).read_text())
        )
        data = train_config.data if config.data_dir is None else replace(train_config.data, data_dir=config.data_dir)
        splits = load_splits(data, config.cache_dir or train_config.cache_dir)
        model, architecture = load_model(model_path)
    if architecture.num_classes != splits.num_classes:
        raise CheckpointError(
            f"the student of run {source.run_id} has {architecture.num_classes} classes but {splits.label} has "
            f"{splits.num_classes}"
        )
    model = model.cpu().eval()
    with _staging(config.out) as staging:
        summary = _build(config, source, model, architecture, splits, staging)
        summary["mlflow"] = _log(config, source, client, staging, summary)
        summary["files"] = sorted(path.name for path in staging.iterdir()) + [SUMMARY]
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _build(config: ExportConfig, source: Source, model, architecture, splits, staging: Path) -> dict[str, Any]:
    """Write the ONNX file(s) into ``staging``, check parity, time them; the summary without MLflow."""
    from kdsearch.models.classifiers import count_flops, count_parameters
    from kdsearch.runtime.onnx_runtime import export_onnx, parity, quantize_int8, session

    threads = torch.get_num_threads()
    fp32 = export_onnx(model, staging / MODEL, splits.image_size)
    checked = parity(model, session(fp32, threads), splits.test_images, labels=splits.test_labels)
    if checked["top1_agreement"] < config.min_agreement:
        raise CheckpointError(
            f"parity check failed: the ONNX model agrees with PyTorch on {checked['top1_agreement']:.2f} % of "
            f"{len(splits.test_labels)} test images (max |logit diff| {checked['max_abs_logit_diff']:.3g}), below "
            f"{config.min_agreement} %; nothing was exported"
        )
    files = {Runtime.ONNX_FP32.value: fp32}
    accuracy = {"torch": checked["torch_accuracy"], Runtime.ONNX_FP32.value: checked["onnx_accuracy"]}
    summary: dict[str, Any] = {
        "out": str(config.out),
        "source": _describe_source(source),
        "model": {
            "arch": architecture.arch,
            "drop_blocks": architecture.drop_blocks,
            "width_mult": architecture.width_mult,
            "pruned": architecture.channels is not None,
            "params": count_parameters(model),
            "flops": count_flops(model, splits.image_size),
            "image_size": splits.image_size,
            "classes": list(splits.classes),
        },
        "dataset": source.run_params.get("data.name", splits.label),
        "test_images": len(splits.test_labels),
        "parity": {key: checked[key] for key in ("top1_agreement", "max_abs_logit_diff")},
        "min_agreement": config.min_agreement,
    }
    if config.int8:
        generator = torch.Generator().manual_seed(0)
        count = min(config.calibration_images, len(splits.train_labels))
        calibration = splits.train_images[torch.randperm(len(splits.train_labels), generator=generator)[:count]]
        files[Runtime.ONNX_INT8.value] = quantize_int8(fp32, staging / INT8, calibration)
        quantized = parity(
            model, session(files[Runtime.ONNX_INT8.value], threads), splits.test_images, labels=splits.test_labels
        )
        accuracy[Runtime.ONNX_INT8.value] = quantized["onnx_accuracy"]
        summary["int8"] = {
            "calibration_images": count,
            "top1_agreement": quantized["top1_agreement"],
            "max_abs_logit_diff": quantized["max_abs_logit_diff"],
            "accuracy_drop": checked["onnx_accuracy"] - quantized["onnx_accuracy"],  # points, fp32 - int8
        }
    summary["accuracy"] = accuracy
    summary["size_bytes"] = {runtime: path.stat().st_size for runtime, path in files.items()}
    summary["latency"] = _latency(config, files)
    return summary


def _describe_source(source: Source) -> dict[str, Any]:
    return {
        "study": source.study,
        "kind": source.kind,
        "trial": source.trial,
        "best": source.best,
        "params": source.trial_params,
        "val_acc": source.val_acc,
        "run_id": source.run_id,
    }


def _latency(config: ExportConfig, files: dict[str, Path]) -> dict[str, Any]:
    """Median ms per batch size of each file on ``config.threads`` threads, with the other processes'
    cores meanwhile (a busy machine inflates the times)."""
    from kdsearch.infra.cpu_load import OtherProcesses
    from kdsearch.infra.cpu_share import machine_share
    from kdsearch.infra.device import device_name
    from kdsearch.runtime.onnx_runtime import onnx_latency_ms, session

    milliseconds = {}
    with machine_share().timing(), OtherProcesses() as others:
        for runtime, path in files.items():
            runner = session(path, config.threads)
            milliseconds[runtime] = {
                str(batch): onnx_latency_ms(runner, batch, config.warmup, config.repeats)
                for batch in config.batch_sizes
            }
    return {
        "ms": milliseconds,
        "threads": config.threads,
        "warmup": config.warmup,
        "repeats": config.repeats,
        "cpu": device_name(torch.device("cpu")).split(" (")[0].removeprefix("cpu:"),
        "onnxruntime": version("onnxruntime"),
        "other_cores": others.cores,
    }


def _log(config: ExportConfig, source: Source, client, staging: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A new export run under the training run: metrics, the logged fp32 model, the card, the int8 file."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from kdsearch.runtime.timing import metric_name

    tags = {
        **run_tags(torch.device("cpu")),
        MLFLOW_PARENT_RUN_ID: source.run_id,
        ROLE_TAG: "export",
        "kdsearch.source_run": source.run_id,
        **({"kdsearch.study": source.study} if source.study is not None else {}),
        **({"kdsearch.trial": str(source.trial)} if source.trial is not None else {}),
    }
    name = _model_name(source)
    try:
        run = client.create_run(source.experiment_id, run_name=f"export-{name}", tags=tags)
    except MlflowException as error:
        raise TrackingError(f"cannot create the export run in {config.tracking_uri}: {_first_line(error)}") from None
    run_id = run.info.run_id
    try:
        metrics = {
            "test_acc_torch": summary["accuracy"]["torch"],
            "test_acc_onnx_fp32": summary["accuracy"][Runtime.ONNX_FP32.value],
            "top1_agreement": summary["parity"]["top1_agreement"],
            "max_abs_logit_diff": summary["parity"]["max_abs_logit_diff"],
        }
        if "int8" in summary:
            metrics["test_acc_onnx_int8"] = summary["accuracy"][Runtime.ONNX_INT8.value]
            metrics["accuracy_drop_int8"] = summary["int8"]["accuracy_drop"]
        for runtime, timings in summary["latency"]["ms"].items():
            metrics |= {metric_name(runtime, int(batch)): value for batch, value in timings.items()}
        client.log_batch(run_id, metrics=_metrics(metrics))
        client.log_batch(
            run_id,
            params=_params({"format": config.format, "int8": config.int8, "min_agreement": config.min_agreement}),
        )
        logged = _log_model(config, source, run_id, staging / MODEL, name)
        record = {"export_run_id": run_id, **logged}
        (staging / CARD).write_text(model_card(summary | {"mlflow": record}, config.command))
        client.log_artifact(run_id, str(staging / CARD))
        if config.int8:
            client.log_artifact(run_id, str(staging / INT8))
    except BaseException as error:
        client.set_terminated(run_id, "FAILED")
        if isinstance(error, MlflowException):
            raise TrackingError(f"logging the export to {config.tracking_uri} failed: {_first_line(error)}") from None
        raise
    client.set_terminated(run_id, "FINISHED")
    return record


def _log_model(config: ExportConfig, source: Source, run_id: str, path: Path, name: str) -> dict[str, Any]:
    """``mlflow.onnx.log_model`` under the export run: the fluent API needs the run active, and puts the
    logged model in the active run's experiment."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    from mlflow.models import infer_signature

    from kdsearch.runtime.onnx_runtime import INPUT, OUTPUT, session

    runner = session(path)
    shape = runner.get_inputs()[0].shape
    example = np.random.default_rng(0).random((1, *shape[1:]), dtype=np.float32)
    signature = infer_signature({INPUT: example}, {OUTPUT: runner.run([OUTPUT], {INPUT: example})[0]})
    with _process_tracking_uri(MlflowTracker(config.tracking_uri).uri), mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(path)),
            name=name,
            signature=signature,
            input_example={INPUT: example},
            registered_model_name=config.register,
            # Pinned rather than inferred: inference imports the model in a subprocess (~13 s here).
            pip_requirements=[f"onnx=={version('onnx')}", f"onnxruntime=={version('onnxruntime')}"],
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,  # one self-contained file, as in --out
            params=source.run_params,
            tags={"kdsearch.source_run": source.run_id, "kdsearch.format": Runtime.ONNX_FP32.value},
        )
    registered = (
        {"name": config.register, "version": str(info.registered_model_version)}
        if config.register is not None
        else None
    )
    return {"model_id": info.model_id, "model_uri": info.model_uri, "registered": registered}


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then put back.

    ``log_model`` reads only that global. ``mlflow.set_tracking_uri`` also writes (or, for None, removes)
    the MLFLOW_TRACKING_URI variable, which kdsearch's --tracking-uri reads as its default, so the variable
    is put back too: otherwise a later command in the same process would log to this store.
    """
    from mlflow.tracking._tracking_service import utils

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with utils._use_tracking_uri(uri):  # restores the global as it was, also "not set"
            yield
    finally:
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def _model_name(source: Source) -> str:
    """The logged model's name: study-trial-N, or the run id; MLflow allows letters, digits, - and _."""
    if source.study is not None and source.trial is not None:
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{source.study}-trial-{source.trial}")
    return f"run-{source.run_id[:8]}"


def _metrics(values: dict[str, float]):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in values.items()]


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(key, str(value)) for key, value in values.items()]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` if the block succeeds; else it, and any
    parent directories made for it, are removed."""
    made = [parent for parent in reversed(out.absolute().parents) if not parent.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield staging
        _readable(staging)
        staging.rename(out)  # over an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _readable(directory: Path) -> None:
    """Give the export the permissions of ordinary new files: mkdtemp, and the mkstemp that wrote the
    ONNX files, make them private to the owner."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def short_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints: where the export went, from which trial, and its parity, accuracy and latency."""
    source, record = summary["source"], summary["mlflow"]
    short = {
        "out": summary["out"],
        "files": summary["files"],
        "study": source["study"],
        "trial": source["trial"],
        "params": source["params"],
        "run_id": source["run_id"],
        "dataset": summary["dataset"],
        "student_params": summary["model"]["params"],
        "flops": summary["model"]["flops"],
        "top1_agreement": summary["parity"]["top1_agreement"],
        "max_abs_logit_diff": summary["parity"]["max_abs_logit_diff"],
        "test_acc": summary["accuracy"],
        "latency_ms": summary["latency"]["ms"],
        "model_uri": record["model_uri"],
        "export_run_id": record["export_run_id"],
        "registered": record["registered"],
    }
    if "int8" in summary:
        short["int8_accuracy_drop"] = summary["int8"]["accuracy_drop"]
    return short


# --- the model card ----------------------------------------------------------------------------


def model_card(summary: dict[str, Any], command: str | None = None) -> str:
    """MODEL_CARD.md of an export summary: what the model is, how accurate and fast, and how it was made."""
    # Long because it is the card's text, section by section.
    source, model, latency = summary["source"], summary["model"], summary["latency"]
    runtimes = list(latency["ms"])
    batches = list(latency["ms"][runtimes[0]])
    title = (
        f"trial {source['trial']} of study {source['study']}"
        if source["study"] is not None
        else f"run {source['run_id']}"
    )
    shape = f"{model['image_size']}×{model['image_size']}"
    lines = [
        f"# Model card: {title}",
        "",
        f"A {model['arch']} student (drop_blocks={model['drop_blocks']}, width {model['width_mult']:g}"
        f"{', structurally pruned' if model['pruned'] else ''}) for {len(model['classes'])}-class "
        f"{summary['dataset']} images, exported to ONNX by kdsearch {version('kdsearch')} on "
        f"{datetime.now(UTC):%Y-%m-%d}.",
        "",
        f"- Input `pixels`: float32 (batch, 3, {model['image_size']}, {model['image_size']}), RGB values in [0, 1]; "
        "the normalisation is inside the graph. Output `logits`: float32 (batch, classes).",
        f"- Classes, in logit order: {', '.join(model['classes'])}.",
        f"- Parameters: {model['params']:,}. FLOPs per {shape} image: {model['flops']:,} (a multiply-add counts 2).",
        f"- Files: {MODEL} ({summary['size_bytes'][Runtime.ONNX_FP32.value]:,} bytes)"
        + (f", {INT8} ({summary['size_bytes'][Runtime.ONNX_INT8.value]:,} bytes)" if "int8" in summary else "")
        + ".",
        "",
        f"## Accuracy on the test set of {summary['dataset']} ({summary['test_images']:,} images)",
        "",
        "| model | top-1 accuracy (%) | top-1 agreement with PyTorch (%) | max abs logit difference |",
        "| --- | ---: | ---: | ---: |",
        f"| PyTorch fp32 | {summary['accuracy']['torch']:.2f} | | |",
        f"| ONNX fp32 | {summary['accuracy'][Runtime.ONNX_FP32.value]:.2f} | "
        f"{summary['parity']['top1_agreement']:.2f} | {summary['parity']['max_abs_logit_diff']:.3g} |",
    ]
    if "int8" in summary:
        int8 = summary["int8"]
        lines.append(
            f"| ONNX int8 | {summary['accuracy'][Runtime.ONNX_INT8.value]:.2f} | {int8['top1_agreement']:.2f} | "
            f"{int8['max_abs_logit_diff']:.3g} |"
        )
    lines += ["", f"An export is refused below {summary['min_agreement']} % top-1 agreement of ONNX fp32 with PyTorch."]
    if "int8" in summary:
        int8 = summary["int8"]
        lines.append(
            f"int8 (static QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on "
            f"{int8['calibration_images']} training images) costs {int8['accuracy_drop']:.2f} points of accuracy "
            "against ONNX fp32."
        )
    if source["val_acc"] is not None:
        lines.append(f"Validation accuracy (what the study selected on): {source['val_acc']:.2f} %.")
    lines += [
        "",
        f"## Latency (ms per batch, median of {latency['repeats']} runs after {latency['warmup']} warm-up)",
        "",
        f"ONNX Runtime {latency['onnxruntime']}, CPUExecutionProvider, {latency['threads']} "
        f"thread{'' if latency['threads'] == 1 else 's'}, "
        f"on {latency['cpu']}.",
        "",
        "| model | " + " | ".join(f"batch {batch}" for batch in batches) + " |",
        "| --- | " + " | ".join("---:" for _ in batches) + " |",
        *(
            f"| ONNX {runtime.removeprefix('onnx-')} | "
            + " | ".join(f"{latency['ms'][runtime][batch]:.3f}" for batch in batches)
            + " |"
            for runtime in runtimes
        ),
    ]
    if latency["other_cores"] is not None:
        lines += ["", f"Other processes used {latency['other_cores']:.2f} cores meanwhile (more inflates the times)."]
    lines += ["", "## How it was made", ""]
    if source["study"] is not None:
        chosen = " (its best by validation accuracy)" if source["best"] else ""
        kind = f"{source['kind']} " if source["kind"] else ""
        lines.append(f"- Trained as trial {source['trial']}{chosen} of the {kind}study `{source['study']}`.")
    if source["params"] is not None:
        lines.append("- Trial params: " + ", ".join(f"{key}={value}" for key, value in source["params"].items()) + ".")
    lines.append(f"- MLflow training run `{source['run_id']}` (its `config.json` is the full training config).")
    record = summary.get("mlflow")
    if record is not None:
        registered = record["registered"]
        lines.append(
            f"- Logged model `{record['model_uri']}` under the export run `{record['export_run_id']}`"
            + (f"; registered as `{registered['name']}` version {registered['version']}" if registered else "")
            + "."
        )
    if command is not None:
        lines.append(f"- Exported with: `{command}`")
    return "\n".join(lines) + "\n"
