"""The ``kdsearch`` command line: thin commands that build a config and call one library function.

Errors a user can fix (bad values, missing files, unreachable services) print one line on stderr and
exit with code 2, before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from kdsearch.cli.dashboard import register as register_dashboard
from kdsearch.cli.export import register as register_export
from kdsearch.cli.options import (
    DEFAULT_ATTRIBUTION,
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA,
    DEFAULT_DATA_DIR,
    DEFAULT_IG,
    DEFAULT_KD,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    DEFAULT_OPTIM,
    DEFAULT_OVERLAY,
    PAPER_STUDENT,
    RECIPE,
    AttributionMethodName,
    CacheDir,
    DataDir,
    DataLabel,
    Dataset,
    IGBaseline,
    IGMethod,
    IGPrecision,
    IGSteps,
    SplitSeed,
    TeacherCheckpoint,
    TrainSubset,
    ValSize,
    data_config,
    default_of,
    ig_config,
    with_options,
)
from kdsearch.cli.report import register as register_report
from kdsearch.cli.storage_proxy import register as register_storage_proxy
from kdsearch.cli.study import register
from kdsearch.config import TrainConfig
from kdsearch.errors import KdsearchError

app = typer.Typer(
    help="Compress image classifiers by knowledge distillation with Integrated Gradients overlays: "
    "train, search hyperparameters with Optuna, run ablations, track them in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
teacher_app = typer.Typer(help="Train or evaluate a teacher.", no_args_is_help=True)
ig_app = typer.Typer(
    help="Integrated Gradients maps of the teacher: compute the cache, look at a map.", no_args_is_help=True
)
app.add_typer(teacher_app, name="teacher")
attr_app = typer.Typer(
    help="Attribution maps of the teacher by any method (IG, saliency, SmoothGrad, GradientShap, DeepLift, GradCAM): "
    "compute a cache, look at one image's maps side by side.",
    no_args_is_help=True,
)
app.add_typer(ig_app, name="ig")
app.add_typer(attr_app, name="attr")
register(app)
register_report(app)
register_export(app)
register_dashboard(app)
register_storage_proxy(app)


Progress = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Progress bars (off: one log line per phase).")
]


def _print_json(payload: dict) -> None:
    typer.echo(json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False))


def _json_safe(value):
    """``value`` with NaN and infinities as None: JSON has no NaN (a teacher without a validation split
    has val_acc NaN), and ``json.dumps`` would write a bare ``NaN`` that JSON parsers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _check_teacher_file(path: str | None) -> None:
    from kdsearch.errors import CheckpointError

    if path is not None and Path(path).is_dir():
        raise CheckpointError(f"teacher checkpoint {path} is a folder; give the checkpoint file (--teacher-checkpoint)")
    if path is not None and not Path(path).is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist (--teacher-checkpoint)")


def _check_resume(run_dir: Path | None, resume: bool) -> None:
    """--resume continues RUN_DIR/last.pt; without one it would silently train from scratch."""
    if resume and run_dir is None:
        raise KdsearchError("--resume needs --run-dir")
    if resume and not (run_dir / "last.pt").is_file():
        raise KdsearchError(f"--resume: nothing to resume in {run_dir} (no last.pt); leave out --resume to start a run")


@app.command("train")
def train_command(
    teacher_checkpoint: TeacherCheckpoint = None,
    temperature: Annotated[float, typer.Option("--t", help="KD temperature T (> 0).")] = DEFAULT_KD.temperature,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Weight of the KD term, in [0, 1]; 0 = plain CE.")
    ] = DEFAULT_KD.alpha,
    p: Annotated[
        float, typer.Option("--p", help="Probability of the IG overlay, in [0, 1]; 0 = no IG.")
    ] = DEFAULT_OVERLAY.p,
    overlay_mode: Annotated[
        str, typer.Option(help="aligned (each image's own map) | shuffled (control).")
    ] = DEFAULT_OVERLAY.mode,
    overlay_method: Annotated[
        AttributionMethodName, typer.Option(help="Whose maps the overlay blends in (the attribution method).")
    ] = DEFAULT_METHOD,
    teacher_logits: Annotated[
        str, typer.Option(help="online (teacher on each augmented batch) | cached.")
    ] = DEFAULT_KD.teacher_logits,
    student_drop: Annotated[
        int, typer.Option(help="Trailing teacher feature blocks removed (5: the paper).")
    ] = PAPER_STUDENT.drop_blocks,
    student_width: Annotated[float, typer.Option(help="Student channel multiplier.")] = PAPER_STUDENT.width_mult,
    student_normalization: Annotated[
        str, typer.Option(help="Student input normalisation: cifar10 | cifar100 | none.")
    ] = PAPER_STUDENT.normalization,
    student_init: Annotated[
        str, typer.Option(help="random (the paper) | teacher (copy the kept blocks).")
    ] = default_of(TrainConfig, "student_init"),
    arch: Annotated[
        str, typer.Option(help="Architecture of teacher and student: mobilenetv2_cifar | tiny_cnn.")
    ] = DEFAULT_MODEL.arch,
    epochs: Annotated[int, typer.Option(help="Training epochs (the paper: 100).")] = default_of(TrainConfig, "epochs"),
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = default_of(TrainConfig, "batch_size"),
    lr: Annotated[float, typer.Option(help="Adam learning rate (the paper: 1e-3).")] = DEFAULT_OPTIM.lr,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, order and augmentation.")] = default_of(
        TrainConfig, "seed"
    ),
    device: Annotated[str, typer.Option(help="auto (CUDA when present, else CPU) | cpu | cuda[:N].")] = default_of(
        TrainConfig, "device"
    ),
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast where native) | fp32 | bf16 | fp16.")
    ] = default_of(TrainConfig, "precision"),
    run_dir: Annotated[Path | None, typer.Option(help="Per-epoch checkpoints and the final model go here.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR/last.pt.")] = False,
    progress: Progress = True,
    dataset: Dataset = DEFAULT_DATA.dataset,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    data_label: DataLabel = None,
    val_size: ValSize = DEFAULT_DATA.val_size,
    train_subset: TrainSubset = None,
    split_seed: SplitSeed = DEFAULT_DATA.split_seed,
    ig_steps: IGSteps = DEFAULT_IG.n_steps,
    ig_method: IGMethod = DEFAULT_IG.method,
    ig_baseline: IGBaseline = DEFAULT_IG.baseline,
    ig_precision: IGPrecision = DEFAULT_IG.precision,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
) -> None:
    """Train one student with KD + IG overlay and print its metrics as JSON."""
    # Long because the signature is the command's option list; the body only builds the config and calls train().
    from kdsearch.config import KDConfig, ModelConfig, OptimConfig, OverlayConfig, TrainConfig
    from kdsearch.distill.preflight import check_inputs
    from kdsearch.distill.train import train
    from kdsearch.infra.storage import check_writable

    _check_resume(run_dir, resume)
    config = TrainConfig(
        data=data_config(dataset, data_dir, data_label, val_size, train_subset, split_seed),
        student=ModelConfig(
            arch=arch, drop_blocks=student_drop, width_mult=student_width, normalization=student_normalization
        ),
        teacher=ModelConfig(arch=arch),
        teacher_checkpoint=teacher_checkpoint,
        student_init=student_init,
        kd=KDConfig(alpha=alpha, temperature=temperature, teacher_logits=teacher_logits),
        ig=ig_config(ig_steps, ig_method, ig_baseline, ig_precision),
        overlay=OverlayConfig(p=p, mode=overlay_mode, method=overlay_method),
        optim=OptimConfig(lr=lr),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
    )
    if config.needs_teacher:
        _check_teacher_file(teacher_checkpoint)
    if run_dir is not None:
        check_writable(run_dir, "--run-dir")
    check_inputs(config)
    result = train(config, run_dir=run_dir, resume=resume, progress=progress)
    _print_json(
        {
            "val_acc": result.val_acc,
            "test_acc": result.test_acc,
            "train_time_s": round(result.train_time_s, 2),
            "images_per_s": round(result.images_per_s, 1),
            "epochs": result.epochs_completed,
            "checkpoint": result.checkpoint,
        }
    )


@teacher_app.command("train")
def teacher_train_command(
    out: Annotated[Path, typer.Option(help="Where to write the teacher checkpoint.")],
    arch: Annotated[str, typer.Option(help="mobilenetv2_cifar | tiny_cnn.")] = DEFAULT_MODEL.arch,
    epochs: Annotated[int, typer.Option(help="Epochs (the shared teacher's recipe).")] = RECIPE.epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = RECIPE.batch_size,
    lr: Annotated[float, typer.Option(help="Peak SGD learning rate.")] = RECIPE.lr,
    seed: Annotated[int, typer.Option(help="Seed.")] = RECIPE.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = default_of(TrainConfig, "device"),
    run_dir: Annotated[Path | None, typer.Option(help="Per-epoch checkpoints (for --resume).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR/last.pt.")] = False,
    progress: Progress = True,
    dataset: Dataset = DEFAULT_DATA.dataset,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    data_label: DataLabel = None,
    val_size: ValSize = 0,
    train_subset: TrainSubset = None,
    split_seed: SplitSeed = DEFAULT_DATA.split_seed,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
) -> None:
    """Train a teacher with a sound CIFAR recipe (SGD Nesterov, warm-up + linear decay, label smoothing,
    crop + flip, bf16 autocast on CPU where native) and write its checkpoint."""
    from kdsearch.config import ModelConfig, TeacherRecipe, replace
    from kdsearch.distill.preflight import check_inputs
    from kdsearch.distill.teacher import recipe_config
    from kdsearch.distill.train import train
    from kdsearch.errors import NotWritable
    from kdsearch.infra.storage import check_writable
    from kdsearch.models.classifiers import save_checkpoint

    _check_resume(run_dir, resume)
    data = data_config(dataset, data_dir, data_label, val_size, train_subset, split_seed)
    config = replace(
        recipe_config(data, ModelConfig(arch=arch), TeacherRecipe(epochs, batch_size, lr, seed)),
        device=device,
        cache_dir=cache_dir,
    )
    if out.is_dir():
        raise NotWritable(f"--out {out} is a folder; give the checkpoint's file name")
    check_writable(out.parent, "--out folder")
    if run_dir is not None:
        check_writable(run_dir, "--run-dir")
    check_inputs(config)
    result = train(config, run_dir=run_dir, resume=resume, progress=progress)
    save_checkpoint(result.model, replace(config.student, num_classes=result.model.classifier[1].out_features), out)
    _print_json({"test_acc": result.test_acc, "val_acc": result.val_acc, "checkpoint": out})


@app.command("eval")
@teacher_app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to evaluate (a teacher's or a student's).")],
    arch: Annotated[
        str, typer.Option(help="Architecture when the checkpoint is a bare state dict.")
    ] = DEFAULT_MODEL.arch,
    drop_blocks: Annotated[
        int, typer.Option(help="Feature blocks removed, for a bare student state dict.")
    ] = DEFAULT_MODEL.drop_blocks,
    normalization: Annotated[
        str, typer.Option(help="Input normalisation for a bare state dict.")
    ] = DEFAULT_MODEL.normalization,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = default_of(TrainConfig, "device"),
    dataset: Dataset = DEFAULT_DATA.dataset,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    data_label: DataLabel = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
) -> None:
    """Test accuracy (fp32) of any checkpoint, teacher or student, with its parameter count, FLOPs and size.

    A kdsearch checkpoint carries its architecture; a bare state dict (e.g. the reference
    implementation's students: --drop-blocks 5 --normalization none) is built from the flags, and
    what is assumed is printed as a warning."""
    from kdsearch.config import ModelConfig
    from kdsearch.deploy.evaluate import evaluate

    data = data_config(dataset, data_dir, data_label, 0, None, 0)
    bare = ModelConfig(arch=arch, drop_blocks=drop_blocks, normalization=normalization)
    result = evaluate(checkpoint, data, bare, device, cache_dir)
    if result.assumed is not None:
        # A wrong normalisation does not fail, it silently costs ~40 points: say what is assumed.
        typer.echo(
            f"warning: {checkpoint} is a bare state dict: assuming --arch {arch} --drop-blocks {drop_blocks} "
            f"--normalization {normalization} (a model trained on unnormalised pixels needs --normalization none)",
            err=True,
        )
    _print_json(result.record())


@dataclass(frozen=True)
class IGInputs:
    """What the ``ig`` and ``attr`` commands share: the teacher, the training split and IG's settings
    (whose baseline, precision and batch sizes the other methods use too)."""

    teacher_checkpoint: TeacherCheckpoint = None
    arch: Annotated[str, typer.Option(help="Teacher architecture.")] = DEFAULT_MODEL.arch
    normalization: Annotated[
        str, typer.Option(help="Input normalisation of the teacher (none: it was trained on raw [0, 1] pixels).")
    ] = DEFAULT_MODEL.normalization
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = default_of(TrainConfig, "device")
    dataset: Dataset = DEFAULT_DATA.dataset
    data_dir: DataDir = DEFAULT_DATA_DIR
    data_label: DataLabel = None
    val_size: ValSize = DEFAULT_DATA.val_size
    train_subset: TrainSubset = None
    split_seed: SplitSeed = DEFAULT_DATA.split_seed
    ig_steps: IGSteps = DEFAULT_IG.n_steps
    ig_method: IGMethod = DEFAULT_IG.method
    ig_baseline: IGBaseline = DEFAULT_IG.baseline
    ig_precision: IGPrecision = DEFAULT_IG.precision
    cache_dir: CacheDir = DEFAULT_CACHE_DIR
    progress: Progress = True

    def attribution(self, method: str):
        """``method`` with these settings (the ``ig`` commands: the other methods' defaults)."""
        from kdsearch.distill.attribution import Attribution

        return Attribution(method, ig_config(self.ig_steps, self.ig_method, self.ig_baseline, self.ig_precision))

    def load(self, attributions: list):
        """(teacher, splits, device), once every input and each attribution's fit to the teacher is checked:
        a bad one is refused before anything is written (the data's cache included)."""
        from kdsearch.config import ModelConfig
        from kdsearch.data.datasets import load_splits
        from kdsearch.distill.preflight import (
            check_data,
            check_device,
            check_explainable,
            check_teacher,
            student_image_size,
        )
        from kdsearch.infra.device import resolve_device
        from kdsearch.infra.storage import check_writable
        from kdsearch.models.classifiers import load_model

        if self.teacher_checkpoint is None:
            raise KdsearchError("--teacher-checkpoint is required")
        data = data_config(
            self.dataset, self.data_dir, self.data_label, self.val_size, self.train_subset, self.split_seed
        )
        check_device(self.device)
        check_writable(self.cache_dir, "--cache-dir")
        _check_teacher_file(self.teacher_checkpoint)
        classes = check_data(data, self.cache_dir).classes
        teacher_config = ModelConfig(arch=self.arch, normalization=self.normalization, num_classes=classes)
        check_teacher(self.teacher_checkpoint, teacher_config)
        check_explainable(teacher_config, attributions, student_image_size(data))
        splits = load_splits(data, self.cache_dir)
        teacher, _ = load_model(self.teacher_checkpoint, teacher_config)
        return teacher, splits, resolve_device(self.device)


@dataclass(frozen=True)
class AttrInputs(IGInputs):
    """The ``attr`` commands' inputs: the ``ig`` commands' and the other methods' settings."""

    samples: Annotated[
        int, typer.Option("--samples", help="smoothgrad, gradient_shap: noisy copies of each image (>= 1).")
    ] = DEFAULT_ATTRIBUTION.samples
    sigma: Annotated[
        float, typer.Option("--sigma", help="smoothgrad, gradient_shap: std of the noise, in [0, 1] pixel units.")
    ] = DEFAULT_ATTRIBUTION.sigma
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="grad_cam: the teacher's module to explain (default: its last conv stage)."),
    ] = DEFAULT_ATTRIBUTION.layer

    def attribution(self, method: str):
        from kdsearch.config import AttributionConfig, replace

        settings = AttributionConfig(samples=self.samples, sigma=self.sigma, layer=self.layer)
        return replace(super().attribution(method), settings=settings)


def _compute(inputs: IGInputs, method: str) -> None:
    """Compute (or find) ``method``'s cache of the training split and print where it is and what it holds."""
    from kdsearch.distill.attribution import attribution_maps

    attribution = inputs.attribution(method)
    teacher, splits, device = inputs.load([attribution])
    artifact = attribution_maps(teacher, splits, attribution, inputs.cache_dir, device, inputs.progress)
    recorded = ("method", "images", "cost", "completeness_relative_error", "settings")
    # A cache made before other methods existed records neither its method nor its cost.
    _print_json({"cache": artifact.path, **{k: artifact.meta[k] for k in recorded if k in artifact.meta}})


def _show(inputs: IGInputs, methods: list[str], index: int, out: Path) -> None:
    """Write the PNG of one training image and its map and overlay by each method."""
    import torch

    from kdsearch.data.datasets import folder_files
    from kdsearch.distill.attribution import attribution_panel, maps_of
    from kdsearch.errors import NotWritable
    from kdsearch.infra.storage import check_writable

    if out.suffix.lower() != ".png":
        raise KdsearchError(f"--out must end in .png but got {out}")
    if out.is_dir():
        raise NotWritable(f"--out {out} is a folder; give the PNG's file name")
    if index < 0:
        raise KdsearchError(f"--index must be >= 0 but got {index}")
    check_writable(out.parent, "--out folder")
    attributions = [inputs.attribution(method) for method in dict.fromkeys(methods)]
    teacher, splits, device = inputs.load(attributions)
    if index >= len(splits.train_labels):
        raise KdsearchError(f"--index must be in [0, {len(splits.train_labels) - 1}] but got {index}")
    maps, sources = {}, []
    for attribution in attributions:
        found, source = maps_of(teacher, splits, attribution, torch.tensor([index]), inputs.cache_dir, device)
        maps[attribution.method] = found[0]
        sources.append(f"{attribution.method} {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    attribution_panel(splits.train_images[index], maps).save(out)
    source = int(splits.train_index[index])
    image = f"image {source} of the dataset's training set"
    if inputs.dataset == "folder":
        _, files = folder_files(Path(inputs.data_dir))
        image = str(files["train"][source][0])
    label = splits.classes[int(splits.train_labels[index])]
    typer.echo(f"wrote {out}: training-split image {index} ({image}), class {label}; maps: {', '.join(sources)}")


Index = Annotated[int, typer.Option(help="Position of the image in the training split.")]


@ig_app.command("compute")
@with_options(IGInputs, "inputs")
def ig_compute_command(*, inputs: IGInputs) -> None:
    """Compute (or find) the IG cache of the training split and print its location and statistics.

    Resumable: an interrupted run continues from its last finished chunk. Concurrent runs compute once.
    """
    _compute(inputs, "integrated_gradients")


@ig_app.command("show")
@with_options(IGInputs, "inputs")
def ig_show_command(
    index: Index,
    out: Annotated[Path, typer.Option(help="PNG to write: original | IG map | overlay.")],
    *,
    inputs: IGInputs,
) -> None:
    """Write a PNG of one training image, its IG map and the overlay (the cached map, else computed now)."""
    _show(inputs, ["integrated_gradients"], index, out)


@attr_app.command("compute")
@with_options(AttrInputs, "inputs")
def attr_compute_command(
    method: Annotated[AttributionMethodName, typer.Option("--method", help="The attribution method.")] = DEFAULT_METHOD,
    *,
    inputs: AttrInputs,
) -> None:
    """Compute (or find) a method's map cache of the training split and print its location, cost and statistics.

    Resumable: an interrupted run continues from its last finished chunk. Concurrent runs compute once.
    """
    _compute(inputs, method)


@attr_app.command("show")
@with_options(AttrInputs, "inputs")
def attr_show_command(
    index: Index,
    out: Annotated[Path, typer.Option(help="PNG to write: the image, then each method's map and overlay.")],
    methods: Annotated[
        list[AttributionMethodName] | None,
        typer.Option("--method", help="A method to draw (repeat the option for several; default: all of them)."),
    ] = None,
    *,
    inputs: AttrInputs,
) -> None:
    """Write a PNG of one training image beside its map and overlay under each method (cached maps, else
    computed now for this image)."""
    _show(inputs, [str(method) for method in methods or list(AttributionMethodName)], index, out)


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 ok, 2 a usage or input error the user can fix, 1 a study
    command none of whose trials completed, 130 interrupted."""
    # kdsearch's own progress lines; libraries (the ONNX exporter's passes, MLflow) only warnings.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("kdsearch").setLevel(logging.INFO)
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=args, prog_name="kdsearch", standalone_mode=False)
        if result == INTERRUPTED:
            # Typer catches Ctrl-C's KeyboardInterrupt itself and returns 130 (no kdsearch command
            # returns a number), so the handler below sees only an interrupt outside a command.
            typer.echo(_interrupted(args), err=True)
        return result if isinstance(result, int) else 0
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.TyperException as error:  # Typer's usage errors: bad option values, unknown options
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        if message:  # empty for a bare `kdsearch`, whose help was already shown
            typer.echo(f"error: {message}", err=True)
        return 2
    except KdsearchError as error:
        typer.echo(f"error: {error}", err=True)
        return error.exit_code
    except FileNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(_interrupted(args), err=True)
        return INTERRUPTED


def _interrupted(args: list[str]) -> str:
    """The line for Ctrl-C: what the interrupted command kept, and how to go on from there."""
    words = [arg for arg in args if not arg.startswith("-")][:2]  # the command, e.g. ["study", "grid"]
    if words[:1] == ["ablate"] or (words[:1] == ["study"] and words[1:] not in (["status"], ["best"])):
        return "interrupted: finished trials and per-epoch checkpoints are kept; run the same command again to resume"
    if words[:1] == ["train"] or words == ["teacher", "train"]:
        if not any(arg == "--run-dir" or arg.startswith("--run-dir=") for arg in args):
            return "interrupted: nothing was kept (a run with --run-dir can be resumed)"
        return "interrupted: the per-epoch checkpoints in --run-dir are kept; run the same command with --resume"
    if words[:1] == ["ig"] or words[:1] == ["attr"]:
        return "interrupted: finished chunks of the map cache are kept; run the same command again to resume"
    if words[:1] == ["ui"]:
        return "stopped the MLflow UI"
    return "interrupted"


def entry() -> None:
    sys.exit(main())
