"""Frozen, validated configuration for every piece of a kdsearch run.

Study files and CLI flags are turned into these dataclasses and nothing else; checkpoints and MLflow
runs store ``to_dict(config)`` so a run can be rebuilt from its record alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kdsearch.errors import ConfigError

# Images per evaluation forward. Small batches keep a 32-pixel network's activations in the CPU's cache:
# 64 alone ran the teacher 1.8-2.3x and the paper's student 1.5-2.0x faster than 500 on the 2-core AMD
# EPYC (fp32 and bf16; bench/eval_throughput.py, BENCHMARKS.md). Results do not depend on it (eval mode).
EVAL_BATCH_SIZE = 64

# --- the named choices ------------------------------------------------------------------------
# Declared here, where configs are validated, so config imports no engine module; each registry
# (data.datasets.DATASETS, models.classifiers.ARCHITECTURES, ...) is keyed by its enum, and tests check that they match.
# Configs store the plain string value, so checkpoints, caches and MLflow params hold plain strings.


class Dataset(StrEnum):
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    FOLDER = "folder"
    SYNTHETIC = "synthetic"


class Architecture(StrEnum):  # built in; any other model is named by a ModelSource
    MOBILENETV2_CIFAR = "mobilenetv2_cifar"
    TINY_CNN = "tiny_cnn"


class ModelSource(StrEnum):  # ``arch: SOURCE:NAME`` — where a model that is not built in comes from
    TORCHVISION = "torchvision"  # torchvision:resnet18 — any classification builder of torchvision.models
    TIMM = "timm"  # timm:resnet18 — timm.create_model (pip install 'kdsearch[timm]')
    PYTHON = "python"  # python:package.module:factory — the user's own factory, called with num_classes


class Normalization(StrEnum):
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    IMAGENET = "imagenet"
    NONE = "none"


class TeacherLogits(StrEnum):
    ONLINE = "online"  # the teacher on each augmented batch
    CACHED = "cached"  # once, on the clean training images


class IGBaseline(StrEnum):
    BLACK = "black"
    MEAN = "mean"
    ZEROS_NORMALIZED = "zeros_normalized"


class IGMethod(StrEnum):  # Captum's approximation methods
    GAUSSLEGENDRE = "gausslegendre"
    RIEMANN_TRAPEZOID = "riemann_trapezoid"
    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"


class IGPrecision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class AttributionMethod(StrEnum):  # the teacher's maps, each computed by Captum (distill.attribution.METHODS)
    INTEGRATED_GRADIENTS = "integrated_gradients"  # the paper's
    SALIENCY = "saliency"  # |gradient|
    INPUT_X_GRADIENT = "input_x_gradient"
    SMOOTHGRAD = "smoothgrad"  # the gradient averaged over noisy copies of the image (NoiseTunnel over Saliency)
    GRADIENT_SHAP = "gradient_shap"
    DEEPLIFT = "deeplift"
    GRAD_CAM = "grad_cam"  # LayerGradCam of a convolutional stage, upsampled to the image


class OverlayMode(StrEnum):
    ALIGNED = "aligned"  # each image's own map
    SHUFFLED = "shuffled"  # another image's map: the control for the maps' alignment


class MapCoverage(StrEnum):
    ALL = "all"  # the maps of every training image, computed once before the first run (the full cache)
    DRAWN = "drawn"  # only the maps a run's overlay will draw, computed as runs need them


class Optimizer(StrEnum):
    ADAM = "adam"
    SGD = "sgd"


class Schedule(StrEnum):
    CONSTANT = "constant"
    WARMUP_LINEAR = "warmup_linear"


class StudentInit(StrEnum):
    RANDOM = "random"
    TEACHER = "teacher"


class PadMode(StrEnum):
    CONSTANT = "constant"
    REFLECT = "reflect"


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# --- validation helpers -----------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    # Raised instead of `assert` so the check survives `python -O`.
    if not condition:
        raise ConfigError(message)


def choice(name: str, value: Any, choices: type[StrEnum]) -> str:
    """``value`` as the plain string of one of ``choices``, or a ConfigError listing them."""
    known = [member.value for member in choices]
    _check(isinstance(value, str) and value in known, f"{name} must be one of {known} but got {value!r}")
    return str(choices(value).value)


def check_field_types(config: Any) -> None:
    """Every field of a config dataclass has its annotated type; bools are not numbers here.

    A study file or ``--set`` gives values as YAML/TOML scalars: without this, ``epochs = "three"``
    fails deep inside training and ``epochs = true`` silently trains one epoch.
    """
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        hint = hints[item.name]
        if not _matches(value, hint):
            raise ConfigError(f"{item.name} must be {_describe(hint)} but got {value!r} ({type(config).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(_matches(item, arg) for item, arg in zip(value, args, strict=True))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def check_arch(value: str) -> str:
    """A built-in architecture, or ``torchvision:NAME``, ``timm:NAME``, ``python:MODULE:CALLABLE``; the
    spelling only (whether the model exists is the models package's check, which imports torch)."""
    if value in {member.value for member in Architecture}:
        return Architecture(value).value  # the plain string, also when given the enum member
    source, separator, name = value.partition(":")
    known = [member.value for member in Architecture] + [f"{member.value}:NAME" for member in ModelSource]
    _check(
        bool(separator) and source in {member.value for member in ModelSource} and bool(name.strip(":")),
        f"arch must be one of {known} but got {value!r}",
    )
    if source == ModelSource.PYTHON:
        module, _, factory = name.rpartition(":")
        _check(bool(module) and factory.isidentifier(), f"arch {value!r}: give python:MODULE:CALLABLE")
    return value


def is_built_in(arch: str) -> bool:
    return arch in {member.value for member in Architecture}


def check_device_name(name: str) -> None:
    """The spelling of a device: auto, cpu, mps, cuda or cuda:N. Whether this machine has it is
    ``distill.preflight.check_device``'s question; torch would take ``cuda:abc`` for a device and fail later."""
    _check(
        isinstance(name, str) and re.fullmatch(r"auto|(cpu|cuda|mps)(:[0-9]+)?", name) is not None,
        f"device must be auto, cpu or cuda[:N] but got {name!r}",
    )


def _check_unit_interval(name: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1] but got {value!r}")


def default_data_dir() -> str | None:
    return os.environ.get("KDSEARCH_DATA_DIR") or None


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDSEARCH_CACHE_DIR") or Path.home() / ".cache" / "kdsearch")


# Field metadata of options added after configs were first hashed into cache keys, study identities
# and checkpoints: ``to_dict`` leaves such a field out while it holds its default, so every key made
# before the option existed still matches a config that does not use it.
ADDED_LATER = {"omit_when_default": True}


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # a Dataset
    data_dir: str | None = field(default_factory=default_data_dir)  # download root, or the folder with train/ test/
    label: str | None = None  # human name shown in reports, e.g. "CIFAR-10 (JPEG q75 copy)"
    val_size: int = 5000  # images held out of the training set, stratified, for model selection
    train_subset: int | None = None  # stratified subset of the remaining training images, for quick runs
    split_seed: int = 0  # seeds the validation split and the subset, not the training
    synthetic_size: int = 1200  # synthetic only: training images (test set is a quarter of it)
    # The side the images are trained at; None: the data's own (32 for CIFAR). Others are resized once, at load.
    image_size: int | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "dataset", choice("dataset", self.dataset, Dataset))
        if self.dataset == Dataset.FOLDER:
            _check(
                self.data_dir is not None,
                "dataset 'folder' needs --data-dir (a folder with train/ and test/)",
            )
        _check(self.val_size >= 0, f"val_size must be >= 0 but got {self.val_size}")
        _check(
            self.train_subset is None or self.train_subset > 0,
            f"train_subset must be positive but got {self.train_subset}",
        )
        _check(self.synthetic_size >= 40, f"synthetic_size must be >= 40 but got {self.synthetic_size}")
        _check(
            self.image_size is None or 8 <= self.image_size <= 1024,
            f"image_size must be in [8, 1024] pixels but got {self.image_size}",
        )


def _keyword_pairs(what: str, values: Any) -> tuple[tuple[str, Any], ...]:
    """A mapping (a study file's) or (name, value) pairs (a checkpoint's JSON) as sorted pairs, hashable like
    the rest of a config: lists become tuples."""
    pairs = values.items() if isinstance(values, dict) else values
    if not isinstance(pairs, Iterable) or isinstance(pairs, str):
        raise ConfigError(f"{what} must be a mapping of argument names to values but got {values!r}")
    result = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigError(f"{what} must be a mapping of argument names to values but got {values!r}")
        name, value = pair
        value = tuple(value) if isinstance(value, list) else value
        scalars = value if isinstance(value, tuple) else (value,)
        if not all(v is None or isinstance(v, bool | int | float | str) for v in scalars):
            raise ConfigError(f"{what} {name}: a number, string, boolean or list of them, not {value!r}")
        result.append((name, value))
    names = [name for name, _ in result]
    _check(len(set(names)) == len(names), f"{what} names an argument twice: {names}")
    return tuple(sorted(result))


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenetv2_cifar"  # an Architecture, or SOURCE:NAME of a ModelSource (torchvision:resnet18)
    num_classes: int = 10
    drop_blocks: int = 0  # trailing feature blocks removed (the paper's student: 5)
    width_mult: float = 1.0  # channel multiplier, as in torchvision's MobileNetV2
    normalization: str = "cifar10"  # a Normalization, applied inside the model ("none": raw [0, 1] pixels)
    dropout: float = 0.2  # before the linear head (classifier.0)
    # A pruned network's shape: output channels of every conv in ``features`` (models.classifiers.channel_plan);
    # None: the architecture's own widths.
    channels: tuple[int, ...] | None = field(default=None, metadata=ADDED_LATER)
    # A pruned sourced model's shape: "NAME=in,out,groups" of each Conv2d, "NAME=features" of each norm,
    # "NAME=in,out" of each Linear that pruning changed (models.classifiers.changed_layers).
    pruned_layers: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    # torchvision/timm models for small images: a stride-1 stem without its max-pool (as CIFAR variants do).
    cifar_stem: bool = field(default=False, metadata=ADDED_LATER)
    # Keyword arguments of a torchvision/timm builder or the user's factory beside num_classes, as sorted
    # (name, value) pairs (a study file gives a mapping): timm's `img_size: 32` for a ViT, `patch_size: 4`...
    builder_args: tuple[tuple[str, Any], ...] | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.builder_args is not None:
            object.__setattr__(self, "builder_args", _keyword_pairs("builder_args", self.builder_args))
        check_field_types(self)
        object.__setattr__(self, "arch", check_arch(self.arch))
        for name in ("channels", "pruned_layers"):  # lists after a JSON round trip; tuples keep configs hashable
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(
            self.pruned_layers is None or not is_built_in(self.arch),
            "pruned_layers is for torchvision, timm and own models; built-in ones keep their plan in channels",
        )
        _check(
            not (self.builder_args and is_built_in(self.arch)),
            f"builder_args are for torchvision, timm and own models; {self.arch} takes none",
        )
        reserved = sorted({name for name, _ in self.builder_args or ()} & {"num_classes", "weights", "pretrained"})
        _check(
            not reserved,
            f"builder_args cannot set {', '.join(reserved)}: num_classes is the model's own setting, and weights "
            "come from a local checkpoint (nothing is downloaded)",
        )
        _check(
            not (self.cifar_stem and is_built_in(self.arch)),
            f"cifar_stem is for torchvision and timm models; {self.arch} is built for 32-pixel images already",
        )
        object.__setattr__(self, "normalization", choice("normalization", self.normalization, Normalization))
        _check(self.num_classes >= 2, f"num_classes must be >= 2 but got {self.num_classes}")
        _check(self.drop_blocks >= 0, f"drop_blocks must be >= 0 but got {self.drop_blocks}")
        _check(self.width_mult > 0, f"width_mult must be > 0 but got {self.width_mult}")
        _check_unit_interval("dropout", self.dropout)


@dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.01  # weight of the KL term; 0 is plain cross-entropy
    temperature: float = 2.5
    teacher_logits: str = "online"  # a TeacherLogits

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_unit_interval("alpha", self.alpha)
        _check(
            self.temperature > 0 and math.isfinite(self.temperature),
            f"temperature must be > 0 but got {self.temperature!r}",
        )
        object.__setattr__(self, "teacher_logits", choice("teacher_logits", self.teacher_logits, TeacherLogits))


@dataclass(frozen=True)
class IGConfig:
    baseline: str = "black"  # an IGBaseline
    # 24 trapezoid steps with bf16 autocast: mean map agreement 0.992 with a 256-step map and 19.6x the
    # images/s of Captum's 50 fp32 steps on the AMD EPYC (10.7x in fp32), with a lower completeness
    # error than 20 steps (bench/ig_throughput.py, BENCHMARKS.md).
    n_steps: int = 24
    method: str = "riemann_trapezoid"  # an IGMethod
    internal_batch_size: int = 256  # interpolated images per forward/backward pass
    images_per_call: int = 64  # images given to one Captum attribute() call
    # auto: bf16 autocast where the hardware runs bf16 natively, else fp32; the cache records which.
    precision: str = "auto"  # an IGPrecision

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "baseline", choice("IG baseline", self.baseline, IGBaseline))
        _check(self.n_steps >= 2, f"IG n_steps must be >= 2 but got {self.n_steps}")
        object.__setattr__(self, "method", choice("IG method", self.method, IGMethod))
        _check(
            self.internal_batch_size >= 1,
            f"internal_batch_size must be >= 1 but got {self.internal_batch_size}",
        )
        _check(self.images_per_call >= 1, f"images_per_call must be >= 1 but got {self.images_per_call}")
        object.__setattr__(self, "precision", choice("IG precision", self.precision, IGPrecision))


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the attribution methods other than IG, whose own settings (IGConfig) also give them
    their baseline (deeplift, gradient_shap), precision and batch sizes."""

    # smoothgrad, gradient_shap: noisy copies per image. 24: the passes of IG's default 24 steps, so the
    # three cost alike.
    samples: int = 24
    # smoothgrad, gradient_shap: std of the Gaussian noise in pixel units ([0, 1] images); 0.15 is within the
    # 10-20 % of the input range that SmoothGrad's authors found to work best.
    sigma: float = 0.15
    # grad_cam: the module (a name of named_modules(), e.g. "features.16") whose output is explained;
    # None: the model's last convolutional stage (the last module whose output is a map larger than 1x1).
    layer: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.samples >= 1, f"attribution samples must be >= 1 but got {self.samples}")
        _check(self.sigma >= 0 and math.isfinite(self.sigma), f"attribution sigma must be >= 0 but got {self.sigma!r}")
        _check(self.layer is None or self.layer.strip() != "", "attribution layer must be a module name or null")


@dataclass(frozen=True)
class OverlayConfig:
    p: float = 0.1  # probability that an image gets the overlay (Eq. 7)
    mode: str = "aligned"  # an OverlayMode
    method: str = field(default="integrated_gradients", metadata=ADDED_LATER)  # an AttributionMethod: whose maps
    maps: str = field(default="all", metadata=ADDED_LATER)  # a MapCoverage: which maps are computed

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_unit_interval("p", self.p)
        object.__setattr__(self, "mode", choice("overlay mode", self.mode, OverlayMode))
        object.__setattr__(self, "method", choice("overlay method", self.method, AttributionMethod))
        object.__setattr__(self, "maps", choice("overlay maps", self.maps, MapCoverage))


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # an Optimizer: adam (the paper) | sgd (the teacher recipe)
    lr: float = 1e-3
    weight_decay: float = 0.0  # not applied to BatchNorm weights and biases
    momentum: float = 0.9  # sgd only (Nesterov)
    schedule: str = "constant"  # a Schedule: warmup_linear is a linear warm-up, then linear decay to 0
    warmup_fraction: float = 0.15
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "optimizer", choice("optimizer", self.optimizer, Optimizer))
        _check(self.lr > 0, f"lr must be > 0 but got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0 but got {self.weight_decay}")
        object.__setattr__(self, "schedule", choice("schedule", self.schedule, Schedule))
        _check_unit_interval("warmup_fraction", self.warmup_fraction)
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1) but got {self.label_smoothing}",
        )


class ParetoSampler(StrEnum):
    """Optuna's multi-objective samplers (pareto.SAMPLERS builds each)."""

    TPE = "tpe"
    NSGA2 = "nsga2"


class ExportFormat(StrEnum):
    """What ``kdsearch export`` writes."""

    ONNX = "onnx"


class Runtime(StrEnum):
    """Where a student's latency is measured: PyTorch eager, or ONNX Runtime's CPU provider."""

    TORCH = "torch"
    ONNX_FP32 = "onnx-fp32"
    ONNX_INT8 = "onnx-int8"  # static QDQ quantisation calibrated on training images


@dataclass(frozen=True)
class LatencyConfig:
    warmup: int = 3  # untimed passes first (allocator, oneDNN/cuDNN kernel selection)
    repeats: int = 10  # timed passes; the median is reported
    batch_sizes: tuple[int, ...] = (1, 128)  # the paper reports per-batch latency; 1 is the edge case
    # Timed besides torch eager, once per architecture (runtime.timing.onnx_latency_metrics): where the model
    # ships. Exporting takes a few seconds per architecture; [] times torch eager only.
    onnx_runtimes: tuple[str, ...] = (Runtime.ONNX_FP32.value, Runtime.ONNX_INT8.value)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.warmup < 0:
            raise ConfigError(f"latency warmup must be >= 0 but got {self.warmup}")
        if self.repeats < 1:
            raise ConfigError(f"latency repeats must be >= 1 but got {self.repeats}")
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(f"latency batch_sizes must be positive integers but got {list(self.batch_sizes)}")
        object.__setattr__(self, "onnx_runtimes", tuple(self.onnx_runtimes))
        onnx = [runtime.value for runtime in Runtime if runtime != Runtime.TORCH]
        if unknown := [runtime for runtime in self.onnx_runtimes if runtime not in onnx]:
            raise ConfigError(f"latency onnx_runtimes must be among {', '.join(onnx)} but got {', '.join(unknown)}")


class Importance(StrEnum):
    """How structured pruning ranks channels (pruning.IMPORTANCES builds each)."""

    L1 = "l1"  # magnitude of the group's weights
    L2 = "l2"
    RANDOM = "random"  # a control: does magnitude matter?
    # First-order Taylor: |weight x gradient| summed over the group, the gradient of cross-entropy on a
    # few training images (pruning.TAYLOR_IMAGES): what removing the channels would cost the loss.
    TAYLOR = "taylor"


@dataclass(frozen=True)
class PruneConfig:
    """A student pruned from the teacher (Torch-Pruning): its surviving weights are the teacher's.

    Exactly one target when pruning: ``ratio`` of every prunable group's channels removed,
    ``flops_target``, the fraction of the unpruned network's FLOPs kept, or ``stage_ratios``, one ratio per
    stage of the network (its convolutions grouped by output resolution, highest first). Combines with the
    student's ``drop_blocks`` (blocks removed first) and ``width_mult`` 1 (the teacher's widths).
    """

    ratio: float | None = None
    flops_target: float | None = None
    importance: str = "l2"  # an Importance
    stage_ratios: tuple[float, ...] | None = field(default=None, metadata=ADDED_LATER)  # 0: a stage left whole
    # Iterative pruning: the target reached in ``steps`` equal steps at epoch starts spread over the
    # schedule (pruning.prune_epochs), each ranking the channels of the student recovered so far.
    steps: int = field(default=1, metadata=ADDED_LATER)
    # Sparsity training before pruning: the strength of Torch-Pruning's group-lasso penalty on every
    # prunable group (GroupNormPruner.regularize) from the first epoch to the last step; > 0 moves the
    # first step off epoch 0, so the teacher-initialised student first trains unpruned under it.
    sparsity: float = field(default=0.0, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if self.stage_ratios is not None:
            object.__setattr__(self, "stage_ratios", tuple(self.stage_ratios))
        check_field_types(self)
        targets = [name for name in ("ratio", "flops_target", "stage_ratios") if getattr(self, name) is not None]
        _check(
            len(targets) <= 1,
            f"prune needs one of ratio, flops_target or stage_ratios, not several (got {', '.join(targets)})",
        )
        for name in ("ratio", "flops_target"):
            value = getattr(self, name)
            _check(value is None or 0 < value < 1, f"prune {name} must be in (0, 1) but got {value!r}")
        stages = self.stage_ratios
        _check(
            stages is None or (len(stages) > 0 and all(0 <= r < 1 for r in stages) and any(r > 0 for r in stages)),
            f"prune stage_ratios must be ratios in [0, 1), at least one above 0, but got {stages!r}",
        )
        object.__setattr__(self, "importance", choice("prune importance", self.importance, Importance))
        _check(self.steps >= 1, f"prune steps must be >= 1 but got {self.steps}")
        _check(
            self.sparsity >= 0 and math.isfinite(self.sparsity), f"prune sparsity must be >= 0 but got {self.sparsity}"
        )
        _check(
            not (self.iterative and self.flops_target is not None),
            "iterative pruning (steps > 1) and sparsity training take a ratio or stage_ratios, not flops_target",
        )

    @property
    def active(self) -> bool:
        return self.ratio is not None or self.flops_target is not None or self.stage_ratios is not None

    @property
    def iterative(self) -> bool:
        """Whether the student is pruned during training (steps or sparsity) rather than once before it."""
        return self.steps > 1 or self.sparsity > 0


def pruning_epochs_needed(steps: int, sparsity: float) -> int:
    """The fewest training epochs that hold ``steps`` pruning steps (one epoch each), plus one epoch of
    sparsity training before the first where ``sparsity`` > 0 (``pruning.prune_epochs`` spreads them)."""
    return steps + (sparsity > 0)


@dataclass(frozen=True)
class AttentionConfig:
    """Attention transfer (``kdsearch.distill.attention``): gamma times the mean over block pairs of the
    per-sample L2 distance between student and teacher attention maps."""

    gamma: float = 0.0  # weight of the AT term; 0 is off (no feature taps, no extra teacher forward)
    p: float = 2.0  # attention map Q = mean over channels of |A|^p
    # (student block, teacher block) indices into ``features``; None: the end of every resolution stage
    # the student keeps, paired with the teacher's block of the same spatial size.
    pairs: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.gamma >= 0 and math.isfinite(self.gamma), f"attention gamma must be >= 0 but got {self.gamma!r}")
        _check(self.p > 0 and math.isfinite(self.p), f"attention p must be > 0 but got {self.p!r}")
        if self.pairs is not None:
            _check(len(self.pairs) > 0, "attention pairs: give [[student block, teacher block], ...] or null")
            object.__setattr__(self, "pairs", tuple(tuple(pair) for pair in self.pairs))


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(drop_blocks=5))  # the paper's student
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teacher_checkpoint: str | None = None  # needed when alpha > 0 or p > 0
    student_init: str = "random"  # a StudentInit: random (the paper) | teacher (copy the kept blocks)
    kd: KDConfig = field(default_factory=KDConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig, metadata=ADDED_LATER)
    prune: PruneConfig = field(default_factory=PruneConfig, metadata=ADDED_LATER)
    attribution: AttributionConfig = field(default_factory=AttributionConfig, metadata=ADDED_LATER)
    epochs: int = 100
    batch_size: int = 64
    eval_batch_size: int = EVAL_BATCH_SIZE
    seed: int = 0
    crop_padding: int = 4  # random-crop padding in pixels
    pad_mode: str = "constant"  # a PadMode: constant (zeros, torchvision's default) | reflect
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: str = "auto"  # a Precision: auto is bf16 autocast where supported
    channels_last: bool = True
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.epochs >= 1, f"epochs must be >= 1 but got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1 but got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1 but got {self.eval_batch_size}")
        object.__setattr__(self, "student_init", choice("student_init", self.student_init, StudentInit))
        object.__setattr__(self, "pad_mode", choice("pad_mode", self.pad_mode, PadMode))
        _check(self.crop_padding >= 0, f"crop_padding must be >= 0 but got {self.crop_padding}")
        object.__setattr__(self, "precision", choice("precision", self.precision, Precision))
        check_device_name(self.device)
        if self.needs_teacher:
            _check(
                self.teacher_checkpoint is not None,
                "a teacher checkpoint is needed when alpha > 0, p > 0, gamma > 0, pruning or student_init teacher "
                "(--teacher-checkpoint)",
            )
        if self.prune.iterative:
            needed = pruning_epochs_needed(self.prune.steps, self.prune.sparsity)
            _check(
                self.prune.active and self.epochs >= needed,
                f"prune steps {self.prune.steps}{' after sparsity training' if self.prune.sparsity > 0 else ''} "
                f"need a prune target and at least {needed} epochs (one per step) but got "
                f"{'no target' if not self.prune.active else f'{self.epochs} epochs'}",
            )
        _check(
            not (self.attention.gamma > 0 and self.kd.teacher_logits == TeacherLogits.CACHED),
            "attention transfer (gamma > 0) needs the online teacher's feature maps, which cached logits do not "
            "have: set kd.teacher_logits to online",
        )

    @property
    def needs_teacher(self) -> bool:
        return (
            self.kd.alpha > 0
            or self.overlay.p > 0
            or self.attention.gamma > 0
            or self.prune.active
            or self.student_init == StudentInit.TEACHER
        )


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain values: what cache keys, study identities and checkpoints hold (see ADDED_LATER)."""
    values = dataclasses.asdict(config)
    _omit_later_defaults(config, values)
    return values


def _omit_later_defaults(config: Any, values: dict[str, Any]) -> None:
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.metadata.get("omit_when_default"):
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            if value == default:
                del values[item.name]
                continue
        if dataclasses.is_dataclass(value):
            _omit_later_defaults(value, values[item.name])


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass → flat {"kd.alpha": 0.01, ...}, the form MLflow params and tables use; every
    field, also those ``to_dict`` omits at their default."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _flatten_into(flat, f"{key}.{sub_key}", sub_value)
    else:
        flat[key] = value


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a (nested) config dataclass from plain values, rejecting unknown keys by name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        field_type = known[name].type
        nested = _NESTED.get(field_type) if isinstance(field_type, str) else None
        kwargs[name] = from_dict(nested, value) if nested and isinstance(value, dict) else value
    return cls(**kwargs)


def replace(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


_NESTED = {
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "KDConfig": KDConfig,
    "IGConfig": IGConfig,
    "OverlayConfig": OverlayConfig,
    "OptimConfig": OptimConfig,
    "AttentionConfig": AttentionConfig,
    "PruneConfig": PruneConfig,
    "AttributionConfig": AttributionConfig,
}


@dataclass(frozen=True)
class TeacherRecipe:
    """How kdsearch trains a teacher; the defaults are the shared pretrained teacher's
    (../shared/models/README.md: 18 epochs, batch 256, peak SGD learning rate 0.1)."""

    epochs: int = 18
    batch_size: int = 256
    lr: float = 0.1  # peak SGD learning rate
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.epochs < 1:
            raise ConfigError(f"teacher.train.epochs must be >= 1 but got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"teacher.train.batch_size must be >= 1 but got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"teacher.train.lr must be > 0 but got {self.lr}")
