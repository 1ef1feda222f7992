"""One training run: ``train(config) -> TrainResult``. Students with KD + IG overlay, and teachers.

The training split lives as one uint8 tensor on the device; every batch is gathered, cropped, flipped
and overlaid in a few batched tensor ops (``augment.training_batch``). Each epoch draws from a
generator seeded by (seed, epoch), so a run resumed from its per-epoch checkpoint ends with the same
weights as one that was never interrupted.

    kdsearch train --teacher-checkpoint teacher.pt --t 2.5 --alpha 0.01 --p 0.1 --epochs 4
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdsearch.config import (
    Importance,
    MapCoverage,
    ModelConfig,
    OptimConfig,
    StudentInit,
    TeacherLogits,
    TrainConfig,
    from_dict,
    replace,
    to_dict,
)
from kdsearch.data.datasets import Splits, load_splits
from kdsearch.distill.attention import FeatureTaps, at_loss, check_pairs, default_pairs
from kdsearch.distill.attribution import Attribution, attribution_maps, map_ms
from kdsearch.distill.augment import SMALL_IMAGE, BatchRecipe, batch_overlay_draws, training_batch
from kdsearch.distill.drawn_maps import drawn_maps
from kdsearch.distill.losses import kd_loss
from kdsearch.distill.teacher import cached_teacher_logits, load_teacher
from kdsearch.errors import CheckpointError, TrainingDiverged
from kdsearch.infra.allocator import reuse_freed_memory
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.infra.cpu_share import machine_share, share_threads
from kdsearch.infra.device import autocast_context, resolve_device, resolve_precision
from kdsearch.models.classifiers import (
    CifarClassifier,
    SourcedClassifier,
    build_model,
    changed_layers,
    channel_plan,
    fold_batchnorm,
    init_from_teacher,
    save_checkpoint,
    weights_hash,
)
from kdsearch.models.depthwise import with_fp32_depthwise_backward
from kdsearch.models.inference import accuracy
from kdsearch.models.pruning import TAYLOR_IMAGES, GroupLasso, prune_classifier, prune_epochs, step_target

log = logging.getLogger(__name__)

OVERLAY_STREAM = 1 << 40  # offsets the overlay's per-epoch seed far from every (seed, epoch) of the data stream

EpochCallback = Callable[[int, dict], None]  # (epoch index, history row); may raise to stop (pruning)


@dataclass
class TrainInputs:
    """What a run reads besides its config: data, teacher, attribution maps, cached teacher logits.

    A study builds them once (``prepare_inputs`` of the most demanding trial) and passes them to every
    trial, so trials do not reload the teacher or re-verify the map caches. A run uses only what its
    config asks for: its overlay method's maps when p > 0, logits when alpha > 0 with cached teacher logits.
    """

    splits: Splits
    teacher: CifarClassifier | None = None  # eval mode, on the run's device
    teacher_hash: str | None = None
    # By attribution method: (N, H, W) float16 in training-split order, on the device.
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    map_keys: dict[str, str] = field(default_factory=dict)  # each method's cache key
    map_ms: dict[str, float | None] = field(default_factory=dict)  # each method's cost per map (None: not recorded)
    # Each method's (N,) bool of the images with a map (``overlay.maps: drawn``); absent: every image has one.
    map_coverage: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_logits: torch.Tensor | None = None  # (N, classes) on the device


def prepare_inputs(
    config: TrainConfig,
    progress: bool = True,
    splits: Splits | None = None,
    methods: Iterable[str] | None = None,
    logits: bool | None = None,
    teacher: bool = False,
    runs: Iterable[TrainConfig] | None = None,
) -> TrainInputs:
    """Load (or compute once and cache) what ``config`` needs; ``methods``/``logits`` override whose maps
    (with ``config``'s attribution settings) and whether cached logits are loaded, ``teacher`` loads the
    teacher even when the config needs none. With ``overlay.maps: drawn``, the maps are those the
    overlays of ``runs`` (default: ``config`` alone) will draw."""
    device = resolve_device(config.device)
    splits = splits if splits is not None else load_splits(config.data, config.cache_dir)
    methods = list(methods if methods is not None else [config.overlay.method] if config.overlay.p > 0 else [])
    if not (config.needs_teacher or teacher or methods or logits):
        return TrainInputs(splits)
    teacher = load_teacher(config, splits.num_classes, device)
    inputs = TrainInputs(splits, teacher, weights_hash(teacher))
    runs = list(runs) if runs is not None else [config]
    for method in methods:
        if config.overlay.maps == MapCoverage.DRAWN:
            drawing = [run for run in runs if run.overlay.p > 0 and run.overlay.method == method]
            needed = [drawn_images(run, len(splits.train_labels)) for run in drawing]
            drawn = torch.cat(needed) if needed else torch.zeros(0, dtype=torch.long)
            _use_drawn_maps(inputs, config, method, drawn, progress)
            continue
        artifact = attribution_maps(teacher, splits, Attribution.of(config, method), config.cache_dir, device, progress)
        inputs.maps[method] = artifact.tensors["maps"].to(device)
        inputs.map_keys[method], inputs.map_ms[method] = artifact.path.name, map_ms(artifact)
    cached = config.kd.alpha > 0 and config.kd.teacher_logits == TeacherLogits.CACHED
    if logits if logits is not None else cached:
        inputs.teacher_logits = cached_teacher_logits(teacher, splits, config.cache_dir, device).to(device)
    return inputs


def drawn_images(config: TrainConfig, count: int) -> torch.Tensor:
    """The training images (indices, sorted, unique) whose maps ``config``'s overlay will blend over all
    its epochs, by replaying the overlay's own random stream (``_train_epoch`` draws from the same seeds
    in the same order; the images themselves do not change the draws)."""
    recipe = BatchRecipe(0, "constant", config.overlay.p, config.overlay.mode, False)
    steps = math.ceil(count / config.batch_size)
    drawn = []
    for epoch in range(config.epochs):
        epoch_seed = config.seed * 1_000_003 + epoch
        order = torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed))
        overlay_generator = torch.Generator().manual_seed(epoch_seed + OVERLAY_STREAM)
        for step in range(steps):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            map_index, blended_mask, _ = batch_overlay_draws(index, count, recipe, overlay_generator)
            drawn.append(map_index[blended_mask])
    return torch.unique(torch.cat(drawn)) if drawn else torch.zeros(0, dtype=torch.long)


def _use_drawn_maps(
    inputs: TrainInputs, config: TrainConfig, method: str, needed: torch.Tensor, progress: bool
) -> None:
    """Give ``inputs`` the maps of ``method`` for the images ``needed``, computing the missing ones."""
    device = resolve_device(config.device)
    attribution = Attribution.of(config, method)
    found = drawn_maps(inputs.teacher, inputs.splits, attribution, needed, config.cache_dir, device, progress)
    inputs.maps[method] = found.maps.to(device)
    inputs.map_keys[method], inputs.map_ms[method] = found.key, found.ms_per_map
    if found.have is None:
        inputs.map_coverage.pop(method, None)
    else:
        inputs.map_coverage[method] = found.have


def _cover_drawn_images(run: _Run, progress: bool) -> None:
    """A run whose overlay draws an image without a map (its study prepared the maps of other trials'
    draws, e.g. a TPE trial with a new p) gets the missing maps now."""
    config, inputs = run.config, run.inputs
    coverage = inputs.map_coverage.get(config.overlay.method)
    if run.maps is None or coverage is None:
        return
    needed = drawn_images(config, len(run.train_labels))
    if bool(coverage[needed].all()):
        return
    _use_drawn_maps(inputs, config, config.overlay.method, needed, progress)
    run.maps = inputs.maps[config.overlay.method]


@dataclass
class TrainResult:
    val_acc: float  # % on the held-out validation split, after the last epoch
    test_acc: float  # % on the test set (for reporting only; never used for selection)
    train_time_s: float  # wall time of the epochs, including per-epoch validation, over every resume
    setup_time_s: float  # data, teacher, attribution maps and teacher logits (cached after the first run)
    images_per_s: float  # training images per second in the training steps alone
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    model: CifarClassifier | None = None
    model_config: ModelConfig | None = None  # rebuilds ``model`` (a pruned student's channels included)
    teacher_hash: str | None = None
    maps_cache_key: str | None = None  # the cache of the maps the overlay used (None without overlay)


def _parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights decayed, scales and biases not): weight decay on BatchNorm scales and biases only fights
    the normalisation."""
    return [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]


def _optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    decayed, undecayed = _parameter_groups(model)
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def _schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, round(config.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class _Run:
    """The state of one run between epochs: models, optimiser, data on the device, and its history."""

    config: TrainConfig
    student_config: ModelConfig  # what rebuilds the student: a pruned one's channels included
    inputs: TrainInputs
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    student: CifarClassifier
    online_teacher: CifarClassifier | None  # BN folded; None without KD and AT, or with cached logits
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_images: torch.Tensor
    train_labels: torch.Tensor
    recipe: BatchRecipe
    attention_pairs: list[tuple[int, int]]  # (student block, teacher block); empty without AT
    maps: torch.Tensor | None  # the overlay method's maps; None without overlay
    regularizer: GroupLasso | None = None  # sparsity training's penalty, in the epochs it applies to
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    earlier_train_time: float = 0.0  # spent before a resume, so that train_time_s is the whole run's

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_labels) / self.config.batch_size)


def _set_up(config: TrainConfig, inputs: TrainInputs) -> _Run:
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    splits = inputs.splits
    torch.manual_seed(config.seed)
    student, student_config = build_student(config, inputs, final=False)
    with_fp32_depthwise_backward(student)  # changes only what bf16 autocast on a CPU computes
    student = student.to(device)
    uses_cached_logits = config.kd.teacher_logits == TeacherLogits.CACHED
    online_teacher = None
    if (config.kd.alpha > 0 or config.attention.gamma > 0) and not uses_cached_logits:
        online_teacher = fold_batchnorm(inputs.teacher)  # the teacher only runs in eval mode here
    pairs = []
    if config.attention.gamma > 0:
        pairs = list(config.attention.pairs or default_pairs(student, online_teacher, splits.image_size))
        check_pairs(student, online_teacher, pairs, splits.image_size)
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
        if online_teacher is not None:
            online_teacher = online_teacher.to(memory_format=torch.channels_last)
    optimizer = _optimizer(student, config.optim)
    steps = math.ceil(len(splits.train_labels) / config.batch_size) * config.epochs
    recipe = BatchRecipe(
        config.crop_padding,
        config.pad_mode,
        config.overlay.p,
        config.overlay.mode,
        config.channels_last,
        resized_crop=splits.image_size > SMALL_IMAGE,
    )
    return _Run(
        config=config,
        student_config=student_config,
        inputs=inputs,
        device=device,
        dtype=dtype,
        student=student,
        online_teacher=online_teacher,
        optimizer=optimizer,
        scheduler=_schedule(optimizer, config.optim, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        train_images=splits.train_images.to(device),
        train_labels=splits.train_labels.to(device),
        recipe=recipe,
        attention_pairs=pairs,
        maps=inputs.maps[config.overlay.method] if config.overlay.p > 0 else None,
    )


def build_student(
    config: TrainConfig, inputs: TrainInputs, *, final: bool = True
) -> tuple[CifarClassifier, ModelConfig]:
    """The untrained student of ``config`` and the config that rebuilds it: random, or the teacher's kept
    blocks (student_init teacher), then pruned to ``config.prune``'s target with the teacher's weights.
    With iterative pruning and ``final`` False: the student before its first step, unpruned (training
    prunes it); ``final`` True gives the architecture its last step ends at, as latency measures it."""
    student_config = _unpruned_config(config, inputs)
    student = build_model(student_config)
    if config.student_init == StudentInit.TEACHER or config.prune.active:
        init_from_teacher(student, inputs.teacher)
    if config.prune.active:
        teacher = inputs.teacher  # a built-in student with every block also takes the teacher's head
        if (
            not isinstance(student, SourcedClassifier)
            and student.classifier[1].weight.shape == teacher.classifier[1].weight.shape
        ):
            student.classifier.load_state_dict(teacher.classifier.state_dict())  # (a sourced one took it whole)
        if final or not config.prune.iterative:
            student, student_config = _pruned(student, student_config, inputs, config)
    return student, student_config


def _unpruned_config(config: TrainConfig, inputs: TrainInputs) -> ModelConfig:
    return replace(config.student, num_classes=inputs.splits.num_classes)


def _pruned(
    student: CifarClassifier,
    unpruned_config: ModelConfig,
    inputs: TrainInputs,
    config: TrainConfig,
    step: int | None = None,
) -> tuple[CifarClassifier, ModelConfig]:
    """``student`` pruned to ``config.prune``'s target (or, iterative, to its ``step``'s), and the config
    that rebuilds it: ``unpruned_config`` with the plan."""
    splits, prune = inputs.splits, config.prune
    calibration = None
    if prune.importance == Importance.TAYLOR:  # the first training images, as the split orders them
        calibration = (splits.train_images[:TAYLOR_IMAGES].float().div(255), splits.train_labels[:TAYLOR_IMAGES])
    ratio, stage_ratios, reference = prune.ratio, prune.stage_ratios, None
    if step is not None:
        ratio, stage_ratios = step_target(prune.ratio, prune.stage_ratios, step, prune.steps)
        reference = build_model(unpruned_config)
    pruned = prune_classifier(
        student,
        ratio=ratio,
        flops_target=prune.flops_target,
        stage_ratios=stage_ratios,
        importance=prune.importance,
        seed=config.seed,
        image_size=splits.image_size,
        calibration=calibration,
        reference=reference,
    )
    if isinstance(pruned, SourcedClassifier):
        return pruned, replace(unpruned_config, pruned_layers=changed_layers(pruned, build_model(unpruned_config)))
    return pruned, replace(unpruned_config, channels=channel_plan(pruned))


def _prune_on_schedule(run: _Run, epoch: int) -> None:
    """Iterative pruning: the step due at ``epoch``'s start, if one is, and the sparsity penalty of the
    epochs before the last step (traced again for the network as it now is)."""
    prune = run.config.prune
    if not prune.iterative:
        return
    schedule = prune_epochs(prune.steps, run.config.epochs, prune.sparsity > 0)
    if epoch in schedule:
        step = schedule.index(epoch)
        unpruned = _unpruned_config(run.config, run.inputs)
        student, run.student_config = _pruned(run.student, unpruned, run.inputs, run.config, step=step)
        _use_student(run, student)
        log.info("pruning step %d/%d before epoch %d", step + 1, prune.steps, epoch + 1)
    sparse = prune.sparsity > 0 and epoch < schedule[-1]
    run.regularizer = GroupLasso(run.student, prune.sparsity, run.inputs.splits.image_size) if sparse else None


def _use_student(run: _Run, student: CifarClassifier) -> None:
    """Trains ``student`` from now on (a pruning step's result, or a resumed checkpoint's shape): on the
    run's device and memory format, with the optimiser pointed at its parameters and its moments reset
    (those of removed channels mean nothing, as Torch-Pruning's examples start a new optimiser)."""
    with_fp32_depthwise_backward(student)
    student = student.to(run.device)
    if run.config.channels_last:
        student = student.to(memory_format=torch.channels_last)
    for group, parameters in zip(run.optimizer.param_groups, _parameter_groups(student), strict=True):
        group["params"] = parameters
    run.optimizer.state.clear()
    run.student = student


# Fields that change how a run is measured, not what it trains: a checkpoint written with another value
# continues (eval_batch_size's default went from 500 to 64 while runs were in flight).
NOT_TRAINING = ("eval_batch_size",)


def _trains_alike(stored: dict, config: TrainConfig) -> bool:
    current = to_dict(config)
    return {k: v for k, v in stored.items() if k not in NOT_TRAINING} == {
        k: v for k, v in current.items() if k not in NOT_TRAINING
    }


def _resume(run: _Run, run_dir: Path, discard_foreign_checkpoint: bool) -> None:
    """Continue ``run`` from ``run_dir/last.pt`` when it exists and was written by the same config."""
    path = run_dir / "last.pt"
    if not path.exists():
        return
    state = torch.load(path, map_location=run.device, weights_only=False)
    if not _trains_alike(state["config"], run.config):
        if not discard_foreign_checkpoint:
            raise CheckpointError(f"{path} was written by a different configuration; use a new run dir")
        log.warning("discarding %s: written by another configuration", path)
        return
    if "student_config" in state and state["student_config"] != to_dict(run.student_config):
        run.student_config = from_dict(ModelConfig, state["student_config"])  # pruned further than at set-up
        _use_student(run, build_model(run.student_config))
    run.student.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.history, run.start_epoch = state["history"], state["epoch"]
    # A checkpoint from before kdsearch recorded it: the time already spent is unknown, not zero.
    run.earlier_train_time = state.get("train_time_s", math.nan)
    log.info("resuming %s after epoch %d", run_dir, run.start_epoch)


def _soft_targets(run: _Run, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """The teacher's logits for KD (None without it); one online forward also fills the AT taps."""
    if run.online_teacher is None:
        return run.inputs.teacher_logits[index] if run.config.kd.alpha > 0 else None
    with torch.no_grad():
        logits = run.online_teacher(images)
    return logits if run.config.kd.alpha > 0 else None


@contextlib.contextmanager
def _attention_taps(run: _Run) -> Iterator[tuple[FeatureTaps, FeatureTaps] | None]:
    """Taps on the paired blocks for one epoch (None without AT); every hook is removed at its end."""
    if not run.attention_pairs:
        yield None
        return
    student_blocks, teacher_blocks = zip(*run.attention_pairs, strict=True)
    with (
        FeatureTaps(run.student, student_blocks) as student,
        FeatureTaps(run.online_teacher, teacher_blocks) as teacher,
    ):
        yield student, teacher


def _loss(run: _Run, logits, soft_targets, labels, taps: tuple[FeatureTaps, FeatureTaps] | None) -> torch.Tensor:
    """(1 - α) CE + α T² KL (``kd_loss``), plus γ AT when attention transfer is on."""
    config = run.config
    loss = kd_loss(logits, soft_targets, labels, config.kd.alpha, config.kd.temperature, config.optim.label_smoothing)
    if taps is None:
        return loss
    student, teacher = taps
    attention = at_loss(student.outputs, teacher.outputs, config.attention.p)
    student.clear()
    teacher.clear()
    return loss + config.attention.gamma * attention


def _train_epoch(run: _Run, epoch: int, progress: bool) -> tuple[float, float]:
    """One pass over the training split; returns (mean training loss, seconds of the steps)."""
    from tqdm import tqdm

    config, count = run.config, len(run.train_labels)
    epoch_seed = config.seed * 1_000_003 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)
    # The overlay draws from its own stream so that every arm of one seed gets the same batches,
    # crops and flips: arm-vs-baseline differences are then paired on the data, not only the init.
    overlay_generator = torch.Generator().manual_seed(epoch_seed + OVERLAY_STREAM)
    torch.manual_seed(epoch_seed)  # dropout draws, for exact resumes
    order = torch.randperm(count, generator=generator).to(run.device)
    run.student.train()
    epoch_loss, start = 0.0, time.perf_counter()
    steps = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        leave=False,
        disable=not progress,
    )
    share = machine_share()
    with _attention_taps(run) as taps:
        for step in steps:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            with share.step():
                images = training_batch(run.train_images, index, run.maps, run.recipe, generator, overlay_generator)
                with autocast_context(run.device, run.dtype):
                    logits = run.student(images)
                    soft_targets = _soft_targets(run, images, index)
                loss = _loss(run, logits, soft_targets, run.train_labels[index], taps)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                if run.regularizer is not None:
                    run.scaler.unscale_(run.optimizer)  # the penalty is added to true gradients
                    run.regularizer(run.student)
                run.scaler.step(run.optimizer)
                run.scaler.update()
                run.scheduler.step()
                epoch_loss += loss.item() * len(index)
    return epoch_loss / count, time.perf_counter() - start


def _save_training_state(run: _Run, run_dir: Path, train_time_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": run.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": len(run.history),
        "history": run.history,
        "config": to_dict(run.config),
        "student_config": to_dict(run.student_config),  # iterative pruning changes its shape as it trains
        "train_time_s": train_time_s,
    }
    tmp = run_dir / "last.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / "last.pt")


def train(
    config: TrainConfig,
    *,
    inputs: TrainInputs | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    discard_foreign_checkpoint: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a student (or, with a teacher recipe, a teacher) and return its metrics.

    ``inputs`` reuses data, teacher, attribution maps and logits already in memory (a study's trials); without
    it they are loaded or computed (and cached) here. ``run_dir`` receives ``last.pt`` after every
    epoch and ``model.pt`` at the end; ``resume`` continues from ``last.pt``, and refuses one written
    by another configuration unless ``discard_foreign_checkpoint`` (a study's retried trial, whose
    checkpoint a worker given other paths may have written) starts afresh. ``on_epoch`` is called
    after each epoch's validation (studies prune there).
    """
    setup_start = time.perf_counter()
    share_threads()
    reuse_freed_memory()
    inputs = inputs if inputs is not None else prepare_inputs(config, progress)
    run = _set_up(config, inputs)
    _cover_drawn_images(run, progress)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is not None:
        _resume(run, run_dir, discard_foreign_checkpoint)
    setup_time = time.perf_counter() - setup_start
    loop_start, step_seconds, images_seen = time.perf_counter(), 0.0, 0
    splits, count = inputs.splits, len(run.train_labels)
    for epoch in range(run.start_epoch, config.epochs):
        _prune_on_schedule(run, epoch)
        with OtherProcesses() as others:
            train_loss, seconds = _train_epoch(run, epoch, progress)
        share_threads(others.cores)  # the next epoch's threads: this one's share of what was free
        step_seconds += seconds
        images_seen += count
        val_acc = accuracy(
            run.student, splits.val_images, splits.val_labels, config.eval_batch_size, run.device, run.dtype
        )
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val_acc, "lr": run.scheduler.get_last_lr()[0]}
        run.history.append(row)
        # Also without progress bars: a background run's log then shows how far it got.
        log.info(
            "epoch %d/%d  train_loss %.4f  val_acc %.2f  (%.0f img/s)",
            epoch + 1,
            config.epochs,
            train_loss,
            val_acc,
            count / seconds,
        )
        if run_dir is not None:
            _save_training_state(run, run_dir, run.earlier_train_time + time.perf_counter() - loop_start)
        if on_epoch is not None:
            on_epoch(epoch, row)
    train_time = run.earlier_train_time + time.perf_counter() - loop_start
    return _finish(run, run_dir, train_time, setup_time, images_seen / step_seconds if step_seconds > 0 else math.nan)


def _finish(run: _Run, run_dir: Path | None, train_time: float, setup_time: float, images_per_s: float) -> TrainResult:
    config, splits = run.config, run.inputs.splits
    log.info("testing on %d images", len(splits.test_labels))
    test_acc = accuracy(
        run.student, splits.test_images, splits.test_labels, config.eval_batch_size, run.device, run.dtype
    )
    checkpoint = None
    if run_dir is not None:
        checkpoint = run_dir / "model.pt"
        save_checkpoint(run.student, run.student_config, checkpoint)
    return TrainResult(
        val_acc=run.history[-1]["val_acc"] if run.history else math.nan,
        test_acc=test_acc,
        train_time_s=train_time,
        setup_time_s=setup_time,
        images_per_s=images_per_s,
        epochs_completed=len(run.history),
        history=run.history,
        checkpoint=checkpoint,
        model=run.student,
        model_config=run.student_config,
        teacher_hash=run.inputs.teacher_hash,
        maps_cache_key=run.inputs.map_keys[config.overlay.method] if config.overlay.p > 0 else None,
    )
