"""Study files (YAML or TOML) → a validated, frozen ``StudySpec``; CLI flags override them.

A study file describes one experiment: the base training config of every trial, where the teacher
comes from, and the search spaces of the grid, TPE and ablation commands that use it::

    name: smoke                      # default: the file's stem
    train: {epochs: 1, data: {dataset: synthetic}, student: {arch: tiny_cnn, drop_blocks: 1}, ...}
    teacher: {checkpoint: ../shared/models/teacher.pt}   # or {train: {epochs: 1}}: trained once, cached
    grid: {t: [1, 2.5], alpha: [0.01, 0.1], p: [0.1]}
    tpe: {trials: 20, t: {low: 1, high: 10, log: true}, pruner: median}
    ablation: {seeds: 3, t: 2.5, alpha: 0.01, p: 0.1, agreement_images: 500}
    latency: {warmup: 3, repeats: 10}

Relative paths (data_dir, teacher checkpoint, cache_dir) are relative to the directory kdsearch runs
in, like the same paths given as flags. Every value is checked here, before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from kdsearch.config import (
    ADDED_LATER,
    AttributionMethod,
    Importance,
    LatencyConfig,
    ModelConfig,
    ParetoSampler,
    Runtime,
    TeacherRecipe,
    TrainConfig,
    check_field_types,
    choice,
    from_dict,
    pruning_epochs_needed,
    replace,
)
from kdsearch.distill.preflight import check_inputs
from kdsearch.distill.teacher import recipe_config, trained_teacher_path
from kdsearch.errors import ConfigError, DataError
from kdsearch.infra.storage import check_name_length


class Pruner(StrEnum):
    """What prunes a TPE trial on its per-epoch validation accuracy (search.PRUNERS builds each)."""

    MEDIAN = "median"
    HYPERBAND = "hyperband"
    NONE = "none"


class Arm(StrEnum):
    """The ablation's arms (ablation.ARMS gives each arm's config)."""

    BASELINE = "baseline"  # no KD, no IG
    KD = "kd"
    IG = "ig"
    KD_IG = "kd_ig"
    IG_SHUFFLED = "ig_shuffled"  # KD + IG with another image's map: the control for the maps' alignment
    AT = "at"  # attention transfer (gamma) alone, and combined: the reference implementation's arms
    IG_AT = "ig_at"
    KD_AT = "kd_at"
    KD_IG_AT = "kd_ig_at"
    # KD + the overlay of another attribution method's maps (train.attribution's settings), beside kd_ig ...
    KD_SALIENCY = "kd_saliency"
    KD_INPUT_X_GRADIENT = "kd_input_x_gradient"
    KD_SMOOTHGRAD = "kd_smoothgrad"
    KD_GRADIENT_SHAP = "kd_gradient_shap"
    KD_DEEPLIFT = "kd_deeplift"
    KD_GRAD_CAM = "kd_grad_cam"
    # ... and its shuffled control, as ig_shuffled is kd_ig's
    SALIENCY_SHUFFLED = "saliency_shuffled"
    INPUT_X_GRADIENT_SHUFFLED = "input_x_gradient_shuffled"
    SMOOTHGRAD_SHUFFLED = "smoothgrad_shuffled"
    GRADIENT_SHAP_SHUFFLED = "gradient_shap_shuffled"
    DEEPLIFT_SHUFFLED = "deeplift_shuffled"
    GRAD_CAM_SHUFFLED = "grad_cam_shuffled"


AT_ARMS = (Arm.AT, Arm.IG_AT, Arm.KD_AT, Arm.KD_IG_AT)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but with the floats people write and without silent duplicate keys.

    PyYAML follows YAML 1.1, which reads 1e-3, 1E-3, -1e+2 and +.5 as strings (a float needs a dot and a
    signed exponent there); YAML 1.2 and TOML read them as numbers, and so does this loader. A key written
    twice in one mapping is an error naming it: PyYAML keeps the last one silently.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # Scalar keys only: a merge key (`<<: *defaults`) may be overridden by its own mapping, and a
            # complex key is refused by PyYAML itself.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:  # also `1` and `true`: equal in Python, they would collapse into one key
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds no Python objects


SEARCH_PARAMS = ("t", "alpha", "p")  # KD temperature, KD weight, IG overlay probability: named like the flags


def _number(name: str, value: Any) -> float:
    # bool is an int in Python; `alpha: yes` in YAML is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number but got {value!r}")
    return float(value)


def _search_value(where: str, name: str, value: Any) -> float:
    number = _number(f"{where} {name}", value)
    if name == "t" and number <= 0:
        raise ConfigError(f"{where} t (temperature) must be > 0 but got {number}")
    if name in ("alpha", "p") and not 0 <= number <= 1:
        raise ConfigError(f"{where} {name} must be in [0, 1] but got {number}")
    if name == "gamma" and number < 0:
        raise ConfigError(f"{where} gamma must be >= 0 but got {number}")
    return number


@dataclass(frozen=True)
class TeacherSpec:
    checkpoint: str | None = None  # a .pt file (kdsearch checkpoint or bare state dict)
    train: TeacherRecipe | None = None  # or: train one with this recipe (once per cache dir)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.train is None):
            raise ConfigError(
                "teacher needs exactly one of 'checkpoint' (a file, or --teacher-checkpoint) or 'train' (a recipe)"
            )


@dataclass(frozen=True)
class GridSpec:
    """The Cartesian product t × alpha × p (× gamma, when given); each dimension a list of distinct values."""

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    p: tuple[float, ...]
    gamma: tuple[float, ...] | None = None  # attention-transfer weights; None: no AT axis (gamma 0)
    student: tuple[str, ...] | None = None  # names of the study's `students`; None: train.student only
    method: tuple[str, ...] | None = None  # attribution methods of the overlay; None: train.overlay.method only

    def __post_init__(self) -> None:
        if self.student is not None:
            object.__setattr__(self, "student", _names("grid student", self.student))
        if self.method is not None:
            object.__setattr__(self, "method", _methods("grid method", self.method))
        for name in (*SEARCH_PARAMS, "gamma"):
            values = getattr(self, name)
            if name == "gamma" and values is None:
                continue
            values = values if isinstance(values, list | tuple) else [values]  # `t: 2.5` is a one-point axis
            if not values:
                raise ConfigError(f"grid {name} needs at least one value")
            numbers = tuple(_search_value("grid", name, value) for value in values)
            if len(set(numbers)) != len(numbers):
                raise ConfigError(f"grid {name} has a repeated value: {list(values)}")
            object.__setattr__(self, name, numbers)

    def axes(self) -> dict[str, list[float]]:
        """The searched axes by name; gamma only when the grid has it, so grids without AT keep their points."""
        axes = {"t": list(self.t), "alpha": list(self.alpha), "p": list(self.p)}
        if self.gamma is not None:
            axes["gamma"] = list(self.gamma)
        if self.student is not None:
            axes["student"] = list(self.student)
        if self.method is not None:
            axes["method"] = list(self.method)
        return axes


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False  # sample log-uniformly (positive bounds only)

    def __post_init__(self) -> None:
        check_field_types(self)
        _number("range low", self.low)
        _number("range high", self.high)
        if self.low > self.high:
            raise ConfigError(f"range low must be <= high but got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0 but got {self.low}")


@dataclass(frozen=True)
class TPESpec:
    trials: int = 20  # completed + pruned trials over all workers and resumes
    t: Range = Range(1.0, 10.0, log=True)
    alpha: Range = Range(0.0, 1.0)
    p: Range = Range(0.0, 0.5)
    lr: Range | None = None  # also search Adam's learning rate (log range)
    gamma: Range | None = None  # also search the attention-transfer weight
    student_drop: tuple[int, int] | None = None  # also search the student depth, [low, high] blocks removed
    # also search the student: names of the study's `students` (left out of the stored space when unset)
    student: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    # also search the overlay's attribution method (left out of the stored space when unset)
    method: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    pruner: str = "median"  # median | hyperband | none, fed with the per-epoch validation accuracy
    startup_trials: int = 4  # median pruner: trials that are never pruned, to get a reference
    seed: int = 0  # TPE's seed in the process that creates the study

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.trials < 1:
            raise ConfigError(f"tpe trials must be >= 1 but got {self.trials}")
        if self.student is not None:
            object.__setattr__(self, "student", _names("tpe student", self.student))
        if self.method is not None:
            object.__setattr__(self, "method", _methods("tpe method", self.method))
        object.__setattr__(self, "pruner", choice("tpe pruner", self.pruner, Pruner))
        for name in ("alpha", "p"):
            bounds = getattr(self, name)
            if bounds.low < 0 or bounds.high > 1:
                raise ConfigError(f"tpe {name} range must lie in [0, 1] but got [{bounds.low}, {bounds.high}]")
        if self.t.low <= 0:
            raise ConfigError(f"tpe t range must be > 0 but got [{self.t.low}, {self.t.high}]")
        if self.gamma is not None and self.gamma.low < 0:
            raise ConfigError(f"tpe gamma range must be >= 0 but got [{self.gamma.low}, {self.gamma.high}]")
        if self.student_drop is not None:
            low, high = self.student_drop
            if not 0 <= low <= high:
                raise ConfigError(
                    f"tpe student_drop must be [low, high] with 0 <= low <= high but got {self.student_drop}"
                )


@dataclass(frozen=True)
class AblationSpec:
    seeds: int = 3
    arms: tuple[str, ...] = ("baseline", "kd", "ig", "kd_ig")
    extra_arms: tuple[str, ...] = ()  # e.g. ig_shuffled, the control for the IG maps' alignment
    t: float = 2.5  # the paper's optimum
    alpha: float = 0.01
    p: float = 0.1
    agreement_images: int = 500  # fixed test images on which student and teacher maps are compared
    gamma: float | None = None  # attention-transfer weight of the AT arms; needed when one is run
    agreement_method: str = "integrated_gradients"  # an AttributionMethod: whose maps are compared

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.seeds < 1:
            raise ConfigError(f"ablation seeds must be >= 1 but got {self.seeds}")
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "extra_arms", tuple(self.extra_arms))
        for arm in self.all_arms:
            choice("ablation arm", arm, Arm)
        if len(set(self.all_arms)) != len(self.all_arms):
            raise ConfigError(f"ablation arms are repeated: {list(self.all_arms)}")
        if "baseline" not in self.all_arms:
            raise ConfigError("ablation arms must include 'baseline' (every Δ is measured against it)")
        for name in SEARCH_PARAMS:
            object.__setattr__(self, name, _search_value("ablation", name, getattr(self, name)))
        if self.agreement_images < 0:
            raise ConfigError(f"ablation agreement_images must be >= 0 but got {self.agreement_images}")
        object.__setattr__(
            self, "agreement_method", choice("ablation agreement_method", self.agreement_method, AttributionMethod)
        )
        at_arms = [arm for arm in self.all_arms if arm in AT_ARMS]
        if at_arms and self.gamma is None:
            raise ConfigError(
                f"ablation arms {at_arms} need the attention-transfer weight: set ablation.gamma (--gamma)"
            )
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(f"ablation gamma must be > 0 but got {self.gamma}")

    @property
    def all_arms(self) -> tuple[str, ...]:
        return self.arms + self.extra_arms


def _ranges(spec: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(spec, name)
        if value is not None and not isinstance(value, Range):
            object.__setattr__(spec, name, _range(f"{section} {name}", value))


RECOVERY_LOSSES = ("kd", "ce")  # pareto.recovery: the base config's KD, or plain cross-entropy


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _distinct_axis(spec: Any, name: str, what: str, valid: Callable[[Any], bool]) -> None:
    """An optional categorical axis of ``spec``: None, or distinct valid values (stored as a tuple)."""
    values = getattr(spec, name)
    if values is None:
        return
    values = tuple(values)
    if not values or len(set(values)) != len(values) or not all(valid(value) for value in values):
        raise ConfigError(f"pareto {name} must be distinct {what} but got {list(values)}")
    object.__setattr__(spec, name, values)


@dataclass(frozen=True)
class ParetoSpec:
    """Accuracy × latency: maximise validation accuracy, minimise the latency measured in ``latency``.

    The student space: ``student_drop`` [low, high] blocks removed, ``widths`` (width multipliers) and
    ``prune_ratios`` (0: unpruned), all categorical so that each architecture is timed once; the KD/IG/AT
    ranges are searched when given and otherwise held at the base config's values.
    """

    trials: int = 24  # complete + pruned (skipped) trials over all workers and resumes
    sampler: str = "tpe"  # a ParetoSampler
    seed: int = 0
    startup_trials: int = 8  # tpe: random trials first
    latency: str = "onnx-fp32"  # a Runtime: torch | onnx-fp32 | onnx-int8
    batch: int = 1
    threads: int = 1
    # constraint: slower architectures are timed and not trained (enqueued references are trained anyway)
    max_latency_ms: float | None = None
    min_val_acc: float | None = None  # constraint on the trained student
    student_drop: tuple[int, int] = (0, 5)
    widths: tuple[float, ...] = (1.0,)
    prune_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.7)
    t: Range | None = None
    alpha: Range | None = None
    p: Range | None = None
    gamma: Range | None = None
    # Points trained first whatever the sampler proposes, e.g. the paper's student for reference:
    # [{student_drop: 5, width: 1.0, prune_ratio: 0.0}]; names left out are sampled.
    enqueue: tuple[dict, ...] = ()
    # Names of the study's `students`: the architecture axis is then which student (each trained as it
    # is named; student_drop, widths and prune_ratios are not searched).
    students: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    # Multi-fidelity (search.rungs): epochs at the end of each rung of one schedule, e.g. [1, 3, 9]; a
    # candidate goes on past a rung only among the best 1/reduction of those that ended it. None: every
    # candidate trains train.epochs. Enqueued points (references) always go on.
    rungs: tuple[int, ...] | None = field(default=None, metadata=ADDED_LATER)
    reduction: int = field(default=3, metadata=ADDED_LATER)
    # Compute budget: epochs over all candidates (each over the same training images), trained or committed
    # (a running candidate to its next rung's end, a reference to its last); no candidate starts, and none
    # is promoted, past it. None: ``trials`` alone bounds the study.
    budget_epochs: int | None = field(default=None, metadata=ADDED_LATER)
    # Recovery that suits pruning, as search axes (None: the base config's, not searched): the importance
    # that ranks channels (an Importance), the recovery loss ("kd": the base config's KD; "ce": plain
    # cross-entropy, no teacher, as pruning papers fine-tune), and per-stage prune ratios: the values each
    # stage's ratio takes (stages: the teacher's convolutions by output resolution), instead of prune_ratios.
    importances: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    recovery: tuple[str, ...] | None = field(default=None, metadata=ADDED_LATER)
    stage_ratios: tuple[float, ...] | None = field(default=None, metadata=ADDED_LATER)
    # Iterative pruning and sparsity training as axes (None: train.prune's, not searched): the steps a
    # pruned candidate reaches its target in (recovering between them), and the group-lasso strengths of
    # sparsity training before its first step (0: none). An unpruned candidate ignores both.
    prune_steps: tuple[int, ...] | None = field(default=None, metadata=ADDED_LATER)
    sparsities: tuple[float, ...] | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        _ranges(self, "pareto", ("t", "alpha", "p", "gamma"))
        if self.rungs is not None:
            rungs = tuple(self.rungs)
            increasing = all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in rungs) and all(
                a < b for a, b in zip(rungs, rungs[1:], strict=False)
            )
            if len(rungs) < 2 or not increasing:
                raise ConfigError(
                    f"pareto rungs must be increasing epochs, at least two, e.g. [1, 3, 9]; got {list(rungs)}"
                )
            object.__setattr__(self, "rungs", rungs)
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 2:
            raise ConfigError(f"pareto reduction must be an integer >= 2 but got {self.reduction!r}")
        if self.budget_epochs is not None and (
            isinstance(self.budget_epochs, bool) or not isinstance(self.budget_epochs, int) or self.budget_epochs < 1
        ):
            raise ConfigError(f"pareto budget_epochs must be an integer >= 1 but got {self.budget_epochs!r}")
        if self.students is not None:
            object.__setattr__(self, "students", _names("pareto students", self.students))
        object.__setattr__(self, "enqueue", tuple(self.enqueue))
        check_field_types(self)
        if self.trials < 1:
            raise ConfigError(f"pareto trials must be >= 1 but got {self.trials}")
        object.__setattr__(self, "sampler", choice("pareto sampler", self.sampler, ParetoSampler))
        object.__setattr__(self, "latency", choice("pareto latency runtime", self.latency, Runtime))
        for name in ("batch", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pareto {name} must be >= 1 but got {getattr(self, name)}")
        low, high = self.student_drop
        if not 0 <= low <= high:
            raise ConfigError(f"pareto student_drop must be [low, high] with 0 <= low <= high but got {low, high}")
        for name in ("widths", "prune_ratios"):
            values = tuple(getattr(self, name))
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"pareto {name} must be distinct values, at least one, but got {list(values)}")
            object.__setattr__(self, name, values)
        if any(not width > 0 for width in self.widths):
            raise ConfigError(f"pareto widths must be > 0 but got {list(self.widths)}")
        if any(not 0 <= ratio < 1 for ratio in self.prune_ratios):
            raise ConfigError(f"pareto prune_ratios must be in [0, 1) but got {list(self.prune_ratios)}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"pareto max_latency_ms must be > 0 but got {self.max_latency_ms}")
        if self.min_val_acc is not None and not 0 <= self.min_val_acc <= 100:
            raise ConfigError(f"pareto min_val_acc must be in [0, 100] but got {self.min_val_acc}")
        if self.importances is not None:
            names = _names("pareto importances", self.importances)
            object.__setattr__(self, "importances", tuple(choice("pareto importance", n, Importance) for n in names))
        if self.recovery is not None:
            names = _names("pareto recovery", self.recovery)
            if any(name not in RECOVERY_LOSSES for name in names):
                raise ConfigError(f"pareto recovery must be among {list(RECOVERY_LOSSES)} but got {list(names)}")
            object.__setattr__(self, "recovery", names)
        _distinct_axis(self, "stage_ratios", "ratios in [0, 1)", lambda r: _is_number(r) and 0 <= r < 1)
        _distinct_axis(
            self, "prune_steps", "integers >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        )
        _distinct_axis(self, "sparsities", "strengths >= 0", lambda v: _is_number(v) and 0 <= v < math.inf)
        if self.sparsities is not None:
            object.__setattr__(self, "sparsities", tuple(float(v) for v in self.sparsities))

    def epochs_needed(self) -> int:
        """The fewest training epochs that hold every candidate's pruning steps and sparsity training."""
        return pruning_epochs_needed(max(self.prune_steps or (1,)), max(self.sparsities or (0.0,)))


@dataclass(frozen=True)
class StudySpec:
    name: str
    train: TrainConfig  # the base config of every trial; teacher_checkpoint is resolved
    teacher: TeacherSpec
    grid: GridSpec | None = None
    tpe: TPESpec | None = None
    ablation: AblationSpec | None = None
    pareto: ParetoSpec | None = None
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # Named students a grid, TPE or Pareto study chooses among (its `student` axis): model specs.
    students: dict[str, ModelConfig] = field(default_factory=dict)
    # The normalised mapping this spec was built from (absolute paths): stored with a study so a
    # worker on another machine rebuilds the same spec, with its own cache_dir.
    source: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_study_name(self.name, "study file name")
        for where, names in (
            ("grid student", self.grid.student if self.grid else None),
            ("tpe student", self.tpe.student if self.tpe else None),
            ("pareto students", self.pareto.students if self.pareto else None),
        ):
            unknown = [name for name in names or () if name not in self.students]
            if unknown:
                raise ConfigError(f"{where} {unknown[0]!r} is not in the study's students {sorted(self.students)}")
        if self.pareto is not None and (self.pareto.prune_steps or self.pareto.sparsities):
            epochs = self.pareto.rungs[-1] if self.pareto.rungs else self.train.epochs
            if epochs < self.pareto.epochs_needed():
                raise ConfigError(
                    f"pareto prune_steps {list(self.pareto.prune_steps or [1])} and sparsities "
                    f"{list(self.pareto.sparsities or [0.0])} need at least {self.pareto.epochs_needed()} epochs "
                    f"(one per pruning step, one of sparsity training) but the candidates train {epochs}"
                )

    def configure(self, params: dict[str, Any]) -> TrainConfig:
        """A trial's config: its search parameters set on the base config (``with_params``)."""
        return with_params(self.train, params, self.students)


def check_study_name(name: str, what: str = "study name") -> None:
    """One rule for a study's name, from --study-name or a study file (whose name makes the default study
    name and MLflow experiment): it names folders, so a plain name in any script, never a path, short
    enough for a file name."""
    if not re.fullmatch(r"[^\W_][\w.-]*", name) or ".." in name:
        raise ConfigError(f"{what} {name!r} must be a plain name (letters, digits, . _ -), not a path")
    check_name_length(name, what)


SECTIONS = ("name", "train", "teacher", "students", "grid", "tpe", "ablation", "pareto", "latency")
PATH_KEYS = (("train", "data", "data_dir"), ("train", "cache_dir"), ("teacher", "checkpoint"))


def read_study_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a .yaml/.yml/.toml study file; syntax errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"study file {path} is a directory; give a .yaml or .toml file in it")
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"study file {path} must end in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"study file {path} is not UTF-8 text: byte 0x{error.object[error.start]:02x} on line {line}"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read study file {path}: {error.strerror}") from None
    try:
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else _load_yaml(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"study file {path} is not valid {path.suffix[1:].upper()}: {_reason(error)}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must hold a mapping of sections {list(SECTIONS)}")
    raw.setdefault("name", path.stem)
    return raw


def _reason(error: Exception) -> str:
    """A YAML or TOML error in one line, with its line and column (PyYAML's own text spans several lines)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted keys set: {"train.epochs": 2, "grid.t": [1, 2]}.

    Unknown keys are not caught here but by the spec's validation, with the same message as in a file.
    """
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted}: {part} is not a section")
            node = child
        node[leaf] = value
    return result


def parse_value(text: str) -> Any:
    """A ``--set`` value, read as a study file's values are: YAML scalars and lists (2, 1e-3, true, null,
    [1, 2], text)."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse value {text!r}: {_reason(error)}") from error


def parse_number_list(flag: str, text: str) -> list[float]:
    """``--t 1,2.5,5`` → [1.0, 2.5, 5.0]; any item that is not a number is an error naming the flag."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            raise ConfigError(f"{flag} takes comma-separated numbers but got {item.strip()!r} in {text!r}") from None
        if not math.isfinite(values[-1]):
            raise ConfigError(f"{flag} takes finite numbers but got {item.strip()!r}")
    return values


def build_spec(raw: dict[str, Any], cwd: Path | None = None) -> StudySpec:
    """Validate a raw study mapping and build its spec; relative paths are taken from ``cwd``."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown study file key(s) {unknown}; known: {list(SECTIONS)}")
    _check_finite(raw)
    source = _absolute_paths(copy.deepcopy(raw), cwd or Path.cwd())
    train_raw = dict(_section(source, "train"))
    if "teacher_checkpoint" in train_raw:
        raise ConfigError(
            "set the teacher in the 'teacher' section (checkpoint: or train:), not train.teacher_checkpoint"
        )
    teacher = _teacher_spec(_section(source, "teacher"))
    # Built first without the teacher's terms: a trained teacher's file is only known from data and cache.
    neutral_terms = {"kd": {"alpha": 0.0}, "overlay": {"p": 0.0}, "attention": {"gamma": 0.0}, "prune": {}}
    neutral = from_dict(TrainConfig, {**_without_teacher(train_raw), **neutral_terms})
    train = from_dict(TrainConfig, {**train_raw, "teacher_checkpoint": teacher_checkpoint_path(teacher, neutral)})
    return StudySpec(
        name=str(source["name"]),
        train=train,
        teacher=teacher,
        grid=_optional(source, "grid", lambda s: _grid_spec(s, train)),
        tpe=_optional(source, "tpe", _tpe_spec),
        ablation=_optional(source, "ablation", lambda s: AblationSpec(**_known(AblationSpec, s, "ablation"))),
        pareto=_optional(source, "pareto", lambda s: ParetoSpec(**_known(ParetoSpec, s, "pareto"))),
        latency=LatencyConfig(**_known(LatencyConfig, _section(source, "latency"), "latency")),
        students=_students(_section(source, "students"), train.student),
        source=source,
    )


def _check_finite(value: Any, key: str = "") -> None:
    """No value of a study (file, --set or flag) is infinite or NaN: no setting means one (a learning rate
    of .inf would only fail the trials, after the study was written)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number but got {value}")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list | tuple):
        for item in value:
            _check_finite(item, key)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    return build_spec(apply_overrides(read_study_file(path), overrides or {}))


def teacher_recipe_config(teacher: TeacherSpec, base: TrainConfig) -> TrainConfig:
    """The TrainConfig that trains the study's teacher (on the study's own training split)."""
    config = recipe_config(base.data, base.teacher, teacher.train)
    return replace(config, device=base.device, precision=base.precision, cache_dir=base.cache_dir)


def teacher_checkpoint_path(teacher: TeacherSpec, base: TrainConfig) -> str:
    """The teacher's file: the given checkpoint, or where the trained teacher is (or will be) cached."""
    if teacher.checkpoint is not None:
        return teacher.checkpoint
    return str(trained_teacher_path(teacher_recipe_config(teacher, base), base.cache_dir))


# Where each searched parameter goes in a TrainConfig: (section, field, type).
PARAM_FIELDS: dict[str, tuple[str, str, type]] = {
    "t": ("kd", "temperature", float),
    "alpha": ("kd", "alpha", float),
    "p": ("overlay", "p", float),
    "gamma": ("attention", "gamma", float),
    "lr": ("optim", "lr", float),
    "student_drop": ("student", "drop_blocks", int),
    "method": ("overlay", "method", str),
}


def with_params(
    config: TrainConfig, params: dict[str, Any], students: dict[str, ModelConfig] | None = None
) -> TrainConfig:
    """The trial's config: search parameters (t, alpha, p, gamma, lr, student_drop) set on the base config,
    and ``student``, a name of ``students``, as its student."""
    if "student" in params:
        config = replace(config, student=(students or {})[params["student"]])
    sections: dict[str, Any] = {}
    for name, value in params.items():
        if name in PARAM_FIELDS:
            section, field_name, kind = PARAM_FIELDS[name]
            current = sections.get(section, getattr(config, section))
            sections[section] = replace(current, **{field_name: kind(value)})
    return replace(config, **sections)


def _names(where: str, values: Any) -> tuple[str, ...]:
    values = tuple(values) if isinstance(values, list | tuple) else (values,)
    if not values or not all(isinstance(value, str) for value in values) or len(set(values)) != len(values):
        raise ConfigError(f"{where} must be distinct student names, at least one, but got {list(values)}")
    return values


def _methods(where: str, values: Any) -> tuple[str, ...]:
    """Distinct attribution methods (AttributionMethod values), at least one."""
    methods = _names(where, values)
    for method in methods:
        choice(where, method, AttributionMethod)
    return methods


def _students(values: dict[str, Any], base: ModelConfig) -> dict[str, ModelConfig]:
    """The study's named students: each a model spec (train.student's keys) with the base's class count."""
    students = {}
    for name, spec in values.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"students {name!r} must be a model spec such as {{arch: ...}} but got {spec!r}")
        try:
            students[str(name)] = from_dict(ModelConfig, {"num_classes": base.num_classes, **spec})
        except ConfigError as error:
            raise ConfigError(f"students {name!r}: {error}") from None
    return students


def _section(source: dict[str, Any], name: str) -> dict[str, Any]:
    value = source.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"study file section {name!r} must be a mapping but got {value!r}")
    return value


def _optional(source: dict[str, Any], name: str, build) -> Any:
    return build(_section(source, name)) if source.get(name) is not None else None


def _known(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} key(s) {unknown}; known: {sorted(known)}")
    return values


def _without_teacher(train_raw: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in train_raw.items() if key not in ("kd", "overlay", "student_init")}


def _teacher_spec(values: dict[str, Any]) -> TeacherSpec:
    values = _known(TeacherSpec, values, "teacher")
    recipe = values.get("train")
    if recipe is not None and not isinstance(recipe, dict):
        raise ConfigError(f"teacher.train must be a mapping of {[f.name for f in dataclasses.fields(TeacherRecipe)]}")
    return TeacherSpec(
        checkpoint=values.get("checkpoint"),
        train=TeacherRecipe(**_known(TeacherRecipe, recipe, "teacher.train")) if recipe is not None else None,
    )


def _grid_spec(values: dict[str, Any], train: TrainConfig) -> GridSpec:
    # An axis the grid does not name is held at the base config's value: `--t 1,2,4` alone varies T only.
    held = {"t": train.kd.temperature, "alpha": train.kd.alpha, "p": train.overlay.p}
    return GridSpec(**{**held, **_known(GridSpec, values, "grid")})


def _range(key: str, value: Any) -> Range:
    """``value`` as a Range; every error names ``key`` ("tpe t"), as the study file has it."""
    if isinstance(value, dict):
        values = _known(Range, value, key)
    elif isinstance(value, list | tuple) and len(value) == 2:
        values = {"low": _number(f"{key} low", value[0]), "high": _number(f"{key} high", value[1])}
    else:
        raise ConfigError(f"{key} must be [low, high] or {{low, high, log}} but got {value!r}")
    try:
        return Range(**values)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def _tpe_spec(values: dict[str, Any]) -> TPESpec:
    values = dict(_known(TPESpec, values, "tpe"))
    for name in ("t", "alpha", "p", "lr", "gamma"):
        if values.get(name) is not None:
            values[name] = _range(f"tpe {name}", values[name])
    if values.get("student_drop") is not None:
        drop = values["student_drop"]
        if not (isinstance(drop, list | tuple) and len(drop) == 2 and all(isinstance(v, int) for v in drop)):
            raise ConfigError(f"tpe student_drop must be [low, high] integers but got {drop!r}")
        values["student_drop"] = tuple(drop)
    return TPESpec(**values)


def _absolute_paths(source: dict[str, Any], cwd: Path) -> dict[str, Any]:
    for keys in PATH_KEYS:
        node = source
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = str((cwd / Path(node[keys[-1]]).expanduser()).resolve())
    return source


def check_files(spec: StudySpec) -> None:
    """Fail early, before a study is created, on a teacher checkpoint or data folder that is missing."""
    if spec.teacher.checkpoint is not None and Path(spec.teacher.checkpoint).is_dir():
        raise ConfigError(f"teacher checkpoint {spec.teacher.checkpoint} is a folder; give the checkpoint file")
    if spec.teacher.checkpoint is not None and not Path(spec.teacher.checkpoint).is_file():
        raise ConfigError(f"teacher checkpoint {spec.teacher.checkpoint} does not exist")
    data = spec.train.data
    if data.dataset == "folder" and not Path(data.data_dir).is_dir():
        raise DataError(f"data folder {data.data_dir} does not exist")
    check_inputs(spec.train)
