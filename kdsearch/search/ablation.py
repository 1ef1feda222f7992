"""The paper's ablation (Table 3): baseline, KD, IG and KD+IG students, each arm × seed, with statistics.

    kdsearch ablate --study studies/cpu-quick.yaml --seeds 3 --extra-arms ig_shuffled

Every arm trains from the same teacher, map caches, data and budget; only alpha and p (and, for the
controls, the overlay's alignment, and for the method arms, whose maps) differ. Seed s of every arm
shares initialisation and batch order, so arms are compared with paired tests over seeds. The runs are
an Optuna study of queued (arm, seed) trials, so an ablation resumes, and shares workers, exactly like a
grid study.

Besides accuracy, each student's **explanation agreement** with the teacher is measured on a fixed set
of test images: per image, the Spearman correlation and the top-10% IoU between the student's and the
teacher's maps (IG by default, ``ablation.agreement_method``; the training caches' settings), averaged
over the images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from scipy import stats

from kdsearch.config import AttributionMethod, TrainConfig, replace
from kdsearch.data.datasets import Splits
from kdsearch.distill.attribution import Attribution, cache_fields, maps_on, resolved
from kdsearch.errors import ConfigError, StudyError
from kdsearch.infra.tensor_cache import TensorCache
from kdsearch.infra.text import number
from kdsearch.models.classifiers import CifarClassifier
from kdsearch.search.study import Objective, StudyHandle, StudyKind, best_trial, find_study
from kdsearch.search.studyfile import AblationSpec, Arm, StudySpec, check_files
from kdsearch.search.trial import TrialRunner

TOP_FRACTION = 0.1  # the IoU compares each map's top 10% of pixels


@dataclass(frozen=True)
class ArmTerms:
    """Which loss terms an arm switches on, at the ablation's T, alpha, p and gamma, and whose maps it overlays."""

    kd: bool
    overlay: bool
    at: bool = False
    # shuffled: each image is overlaid with another image's map, so kd_ig vs ig_shuffled tests whether
    # the map's content about *this* image is what helps.
    overlay_mode: str = "aligned"
    method: str = AttributionMethod.INTEGRATED_GRADIENTS.value  # an AttributionMethod

    def config(self, config: TrainConfig, spec: AblationSpec) -> TrainConfig:
        # T is set on every arm, although it only acts with alpha > 0, so all arms record the same config.
        return replace(
            config,
            kd=replace(config.kd, alpha=spec.alpha if self.kd else 0.0, temperature=spec.t),
            overlay=replace(
                config.overlay, p=spec.p if self.overlay else 0.0, mode=self.overlay_mode, method=self.method
            ),
            attention=replace(config.attention, gamma=spec.gamma if self.at else 0.0),
        )


def method_arm(method: str, shuffled: bool = False) -> Arm:
    """KD + ``method``'s overlay, or its shuffled control; IG's arms kept their names from before the
    other methods (kd_ig, ig_shuffled)."""
    name = "ig" if method == AttributionMethod.INTEGRATED_GRADIENTS else method
    return Arm(f"{name}_shuffled" if shuffled else f"kd_{name}")


OTHER_METHODS = [method for method in AttributionMethod if method != AttributionMethod.INTEGRATED_GRADIENTS]
ARMS: dict[Arm, ArmTerms] = {
    Arm.BASELINE: ArmTerms(kd=False, overlay=False),
    Arm.KD: ArmTerms(kd=True, overlay=False),
    Arm.IG: ArmTerms(kd=False, overlay=True),
    Arm.KD_IG: ArmTerms(kd=True, overlay=True),
    Arm.IG_SHUFFLED: ArmTerms(kd=True, overlay=True, overlay_mode="shuffled"),
    Arm.AT: ArmTerms(kd=False, overlay=False, at=True),
    Arm.IG_AT: ArmTerms(kd=False, overlay=True, at=True),
    Arm.KD_AT: ArmTerms(kd=True, overlay=False, at=True),
    Arm.KD_IG_AT: ArmTerms(kd=True, overlay=True, at=True),
    **{method_arm(method): ArmTerms(kd=True, overlay=True, method=method) for method in OTHER_METHODS},
    **{
        method_arm(method, shuffled=True): ArmTerms(kd=True, overlay=True, overlay_mode="shuffled", method=method)
        for method in OTHER_METHODS
    },
}
# Paired comparisons beyond "each arm vs baseline", made when both arms ran: what the IG overlay adds
# (with and without AT), what AT adds to KD, and what each other method's overlay adds to KD and whether
# its maps' alignment matters.
COMPARISONS = (
    (Arm.KD_IG, Arm.KD),
    (Arm.KD_IG, Arm.IG_SHUFFLED),
    (Arm.KD_AT, Arm.KD),
    (Arm.KD_IG_AT, Arm.KD_IG),
    (Arm.IG_AT, Arm.AT),
    (Arm.KD_IG_AT, Arm.KD_AT),
    *((method_arm(method), Arm.KD) for method in OTHER_METHODS),
    *((method_arm(method), method_arm(method, shuffled=True)) for method in OTHER_METHODS),
)

SEED_RANGE = (0, 2**31 - 1)  # a fixed distribution: Optuna rejects categorical choices that change


def seeds(spec: StudySpec) -> list[int]:
    return [spec.train.seed + index for index in range(spec.ablation.seeds)]


def arm_config(spec: StudySpec, arm: str, seed: int) -> TrainConfig:
    return ARMS[Arm(arm)].config(replace(spec.train, seed=seed), spec.ablation)


class AblationKind(StudyKind):
    """Queued (arm, seed) runs. Resuming with more seeds or arms grows the ablation: runs already
    finished are kept."""

    name = "ablation"
    unit = "arm × seed runs"
    queue = True
    growing = {"arms": ("arms", "extra_arms"), "seeds": ("seeds",)}
    set_once = ("gamma",)

    def validate(self, spec: StudySpec) -> None:
        if spec.ablation is None:
            raise ConfigError("no ablation settings: add an 'ablation' section or give --seeds/--arms")
        if spec.train.data.val_size <= 0:
            raise ConfigError(
                "ablations record validation accuracy as the trials' value: train.data.val_size must be > 0"
            )
        check_files(spec)
        if spec.ablation.agreement_images > 0:
            from kdsearch.distill.preflight import check_data

            test_images = check_data(spec.train.data, spec.train.cache_dir).test_images
            if test_images is not None and spec.ablation.agreement_images > test_images:
                raise ConfigError(
                    f"ablation agreement_images={spec.ablation.agreement_images} exceeds the {test_images} test images"
                )
        configs = [arm_config(spec, arm, spec.train.seed) for arm in spec.ablation.all_arms]
        methods = {config.overlay.method for config in configs if config.overlay.p > 0}
        if spec.ablation.agreement_images > 0:
            methods.add(spec.ablation.agreement_method)
        from kdsearch.distill.preflight import check_attribution

        check_attribution(spec.train, sorted(methods))

    def space(self, spec: StudySpec) -> dict[str, Any]:
        space = {**vars(spec.ablation), "arms": list(spec.ablation.all_arms), "seeds": seeds(spec)}
        del space["extra_arms"]  # folded into arms
        if space["gamma"] is None:
            del space["gamma"]  # as ablations stored before the AT arms existed hold it
        if space["agreement_method"] == AttributionMethod.INTEGRATED_GRADIENTS:
            del space["agreement_method"]  # as ablations stored before other methods existed hold it
        return json.loads(json.dumps(space))

    def check_grown(self, study: optuna.Study, space: dict[str, Any]) -> None:
        known = arm_choices(study)
        new = [arm for arm in space["arms"] if arm not in known]
        if new:
            raise StudyError(
                f"study {study.study_name} was created before the arms {new} existed, and Optuna cannot add choices "
                "to its arm parameter: run them in a new study (--study-name)"
            )

    def total(self, space: dict[str, Any]) -> int:
        return len(space["arms"]) * len(space["seeds"])

    def points(self, space: dict[str, Any]) -> list[dict[str, Any]]:
        # Seed-major, so a partly done ablation has every arm of its first seeds (complete pairs).
        return [{"arm": arm, "seed": seed} for seed in space["seeds"] for arm in space["arms"]]

    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        # Every seed's: with ``overlay.maps: drawn`` the maps of all their draws are computed in one go.
        return [arm_config(spec, point["arm"], point["seed"]) for point in self.points(space)]

    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        spec = handle.spec
        prepared = runner.prepared
        handle.study.set_user_attr("teacher_test_acc", prepared.teacher_metrics["teacher_test_acc"])
        probe = None
        if spec.ablation.agreement_images > 0:
            probe = AgreementProbe.build(
                prepared.inputs.teacher,
                prepared.splits,
                Attribution.of(spec.train, spec.ablation.agreement_method),
                spec.ablation.agreement_images,
                spec.train.cache_dir,
            )
        choices = arm_choices(handle.study)

        def objective(trial: optuna.Trial) -> float:
            arm = trial.suggest_categorical("arm", choices)
            seed = trial.suggest_int("seed", *SEED_RANGE)
            config = arm_config(spec, arm, seed)
            cost = prepared.inputs.map_ms.get(config.overlay.method) if config.overlay.p > 0 else None

            def evaluate(result) -> dict[str, float]:
                metrics = probe.measure(result) if probe is not None else {}
                return metrics | ({"map_ms": cost} if cost is not None else {})

            result = runner.train(
                trial, config, run_name=f"{arm}-seed{seed}", extra_params={"arm": arm}, evaluate=evaluate
            )
            return result.val_acc

        return objective


def arm_choices(study: optuna.Study) -> list[str]:
    """The choices of the trials' arm parameter: those its trials already have, else every arm kdsearch
    knows. Optuna refuses a categorical parameter whose choices change within a study, so a study keeps
    the list it started with (and grows, by queued trials, within it); with the fixed seed range, trials
    queued after the ablation grew share one distribution with the earlier ones."""
    for trial in study.get_trials(deepcopy=False):
        if "arm" in trial.distributions:
            return list(trial.distributions["arm"].choices)
    return [str(arm) for arm in ARMS]


ABLATION = AblationKind()


# --- explanation agreement ---------------------------------------------------------------------


def agreement_index(test_size: int, count: int) -> torch.Tensor:
    """A fixed, seeded sample of test images (sorted), the same for every arm, seed and worker."""
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(test_size, generator=generator)[: min(count, test_size)].sort().values


def explanation_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Mean over images of the Spearman correlation and the top-10% IoU of two stacks of maps (N, H, W)."""
    a = student.reshape(len(student), -1).double().numpy()
    b = teacher.reshape(len(teacher), -1).double().numpy()
    # Average ranks: pixels with equal attribution (e.g. exactly zero) tie instead of ranking arbitrarily.
    rank_a = stats.rankdata(a, axis=1)
    rank_b = stats.rankdata(b, axis=1)
    rank_a -= rank_a.mean(axis=1, keepdims=True)
    rank_b -= rank_b.mean(axis=1, keepdims=True)
    denominator = np.linalg.norm(rank_a, axis=1) * np.linalg.norm(rank_b, axis=1)
    spearman = (rank_a * rank_b).sum(axis=1) / np.maximum(denominator, 1e-12)
    k = max(1, math.ceil(TOP_FRACTION * a.shape[1]))
    top_a = np.zeros_like(a, dtype=bool)
    top_b = np.zeros_like(b, dtype=bool)
    np.put_along_axis(top_a, np.argpartition(-a, k - 1, axis=1)[:, :k], True, axis=1)
    np.put_along_axis(top_b, np.argpartition(-b, k - 1, axis=1)[:, :k], True, axis=1)
    iou = (top_a & top_b).sum(axis=1) / (top_a | top_b).sum(axis=1)
    return {"agreement_spearman": float(spearman.mean()), "agreement_iou_top10": float(iou.mean())}


@dataclass
class AgreementProbe:
    """The fixed test images and the teacher's maps on them (cached); measures a student against them."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_maps: torch.Tensor
    splits: Splits
    attribution: Attribution  # a grad_cam layer is the teacher's; students are explained at their own last stage

    @classmethod
    def build(
        cls, teacher: CifarClassifier, splits: Splits, attribution: Attribution, count: int, cache_dir: str | Path
    ) -> AgreementProbe:
        attribution = resolved(attribution, teacher, splits, next(teacher.parameters()).device)
        index = agreement_index(len(splits.test_labels), count)
        images, labels = splits.test_images[index], splits.test_labels[index]

        def build(scratch: Path):
            return {"maps": maps_on(teacher, images, labels, splits, attribution)}, {"images": len(index)}

        kind, fields = cache_fields(teacher, splits, attribution)
        # "ig_agreement" for IG, as before the other methods existed
        artifact = TensorCache(cache_dir).get_or_build(
            f"{kind}_agreement", {**fields, "split": "test", "count": len(index)}, build
        )
        return cls(images, labels, artifact.tensors["maps"].float(), splits, attribution)

    def measure(self, result) -> dict[str, float]:
        own_layer = replace(self.attribution, settings=replace(self.attribution.settings, layer=None))
        student_maps = maps_on(result.model, self.images, self.labels, self.splits, own_layer)
        return explanation_agreement(student_maps, self.teacher_maps)


# --- Table 3 -----------------------------------------------------------------------------------


@dataclass
class ArmRow:
    arm: str
    n: int
    mean: float
    std: float
    ci: tuple[float, float]  # 95% t-interval of the mean test accuracy
    delta: float  # mean paired difference to the baseline (0 for the baseline)
    p_value: float  # paired t-test against the baseline (nan for the baseline, or with < 2 pairs)
    spearman: float
    iou: float
    maps: str | None = None  # the attribution method whose maps the arm overlays; None without overlay
    map_ms: float = math.nan  # milliseconds per teacher map of that method, where its cache was computed


@dataclass
class Comparison:
    arm: str
    reference: str
    n: int  # seeds both arms completed
    delta: float
    ci: tuple[float, float]  # 95% t-interval of the paired difference
    p_value: float


@dataclass
class MethodRow:
    """One attribution method's arm (KD + its maps' overlay): its cost and what it adds, paired over seeds."""

    arm: str
    method: str
    n: int
    mean: float
    map_ms: float
    vs_baseline: Comparison
    vs_kd: Comparison | None  # None where the kd arm did not run
    vs_shuffled: Comparison | None  # against the method's shuffled control, where it ran
    spearman: float
    iou: float


@dataclass
class AblationTable:
    teacher_test_acc: float | None
    rows: list[ArmRow]
    comparisons: list[Comparison]
    title: str
    methods: list[MethodRow] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        return [vars(row) for row in self.rows] + [{"comparison": vars(c)} for c in self.comparisons]

    def format(self) -> str:
        lines = [self.title, ""]
        width = max([13, *(len(row.arm) for row in self.rows)])
        header = (
            f"{'method':<{width}} {'n':>2}  {'test acc %':<15} {'95% CI':<16} {'Δ vs base':>9} {'p':>7}  "
            f"{'Spearman':>8} {'IoU@10%':>8}"
        )
        lines.append(header)
        lines.append("-" * len(header))
        teacher = f"{self.teacher_test_acc:.2f}" if self.teacher_test_acc is not None else "n/a"
        lines.append(f"{'teacher':<{width}} {'':>2}  {teacher:<15}")
        for row in self.rows:
            base = row.arm == "baseline"
            lines.append(
                f"{row.arm:<{width}} {row.n:>2}  {row.mean:6.2f} ± {number(row.std, '.2f'):<6} "
                f"{_interval(row.ci):<16} {'—' if base else f'{row.delta:+.2f}':>9} "
                f"{'—' if base else number(row.p_value, '.3g'):>7}  {number(row.spearman, '.3f'):>8} {number(row.iou, '.3f'):>8}"
            )
        lines += ["", "Paired comparisons over seeds (t-test on the per-seed differences):"]
        label = max([24, *(len(f"{c.arm} vs {c.reference}") for c in self.comparisons)])
        for c in self.comparisons:
            lines.append(
                f"  {c.arm + ' vs ' + c.reference:<{label}} n={c.n}  Δ {c.delta:+.2f}  95% CI {_interval(c.ci, signed=True)}"
                f"  p {number(c.p_value, '.3g')}"
            )
        if self.methods:
            lines += [
                "",
                "Attribution methods (KD + each method's overlay): ms per teacher map where its cache was computed",
            ]
            for row in self.methods:
                lines.append(f"  {row.arm:<{width}} {row.method:<21} {number(row.map_ms, '.3g'):>8} ms")
        return "\n".join(lines)


def _interval(ci: tuple[float, float], signed: bool = False) -> str:
    if any(math.isnan(bound) for bound in ci):
        return "n/a"
    spec = "+.2f" if signed else ".2f"
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _t_interval(values: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean; nan with fewer than 2 values."""
    if len(values) < 2:
        return (math.nan, math.nan)
    if values.std() == 0:  # scipy's interval is nan for a zero spread; the mean is then exact
        return (float(values.mean()), float(values.mean()))
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return (float(interval.low), float(interval.high))


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[int, float, tuple[float, float], float]:
    common = sorted(set(a) & set(b))
    if not common:
        return 0, math.nan, (math.nan, math.nan), math.nan
    x = np.array([a[s] for s in common])
    y = np.array([b[s] for s in common])
    differences = x - y
    p_value = math.nan
    if len(common) >= 2 and differences.std(ddof=1) > 0:
        p_value = float(stats.ttest_rel(x, y).pvalue)
    return len(common), float(differences.mean()), _t_interval(differences), p_value


def ablation_table(study: optuna.Study) -> AblationTable:
    """Table 3 from the study's completed trials: it needs no tracking store."""
    space = study.user_attrs["kdsearch"]["space"]
    results: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in space["arms"]}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        results[trial.params["arm"]][trial.params["seed"]] = trial.user_attrs
    accuracy = {arm: {seed: attrs["test_acc"] for seed, attrs in runs.items()} for arm, runs in results.items()}
    rows = []
    for arm, runs in results.items():
        values = np.array(list(accuracy[arm].values()))
        n, delta, _, p_value = _paired(accuracy[arm], accuracy["baseline"])
        rows.append(
            ArmRow(
                arm=arm,
                n=len(values),
                mean=float(values.mean()) if len(values) else math.nan,
                std=float(values.std(ddof=1)) if len(values) >= 2 else math.nan,
                ci=_t_interval(values),
                delta=0.0 if arm == "baseline" else delta,
                p_value=math.nan if arm == "baseline" else p_value,
                spearman=_mean([attrs.get("agreement_spearman") for attrs in runs.values()]),
                iou=_mean([attrs.get("agreement_iou_top10") for attrs in runs.values()]),
                maps=ARMS[Arm(arm)].method if ARMS[Arm(arm)].overlay else None,
                map_ms=_mean([attrs.get("map_ms") for attrs in runs.values()]),
            )
        )
    pairs = [(arm, "baseline") for arm in space["arms"] if arm != "baseline"]
    pairs += [pair for pair in COMPARISONS if pair[0] in accuracy and pair[1] in accuracy]
    comparisons = [Comparison(arm, ref, *_paired(accuracy[arm], accuracy[ref])) for arm, ref in pairs]
    title = (
        f"Table 3: test accuracy over {len(space['seeds'])} seed(s); "
        f"T={space['t']}, alpha={space['alpha']}, p={space['p']} (study {study.study_name})"
    )
    methods = _method_rows(rows, comparisons)
    return AblationTable(study.user_attrs.get("teacher_test_acc"), rows, comparisons, title, methods)


def _method_rows(rows: list[ArmRow], comparisons: list[Comparison]) -> list[MethodRow]:
    """The rows of the arms that answer "does this method's overlay help a student": kd_ig, kd_saliency, ..."""
    found = {(c.arm, c.reference): c for c in comparisons}
    method_rows = []
    for row in rows:
        if row.maps is None or row.arm != method_arm(row.maps):
            continue
        method_rows.append(
            MethodRow(
                arm=row.arm,
                method=row.maps,
                n=row.n,
                mean=row.mean,
                map_ms=row.map_ms,
                vs_baseline=found[(row.arm, "baseline")],
                vs_kd=found.get((row.arm, Arm.KD)),
                vs_shuffled=found.get((row.arm, method_arm(row.maps, shuffled=True))),
                spearman=row.spearman,
                iou=row.iou,
            )
        )
    return method_rows


def _mean(values: list[float | None]) -> float:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else math.nan


def log_table(tracker, parent_run: str, table: AblationTable) -> None:
    tracker.log_text(parent_run, table.format(), "table3.txt")
    tracker.log_dict(parent_run, {"teacher_test_acc": table.teacher_test_acc, "rows": table.records()}, "table3.json")


def point_from_study(storage: str, name: str) -> dict[str, float]:
    """T, α and p (and γ where it was searched) of the best trial of the grid or TPE study ``name``,
    for an ablation of the point a search found; ConfigError when the study cannot give them."""
    best = best_trial(find_study(storage, name))
    if best is None:
        raise ConfigError(f"study {name} has no completed trial to take T, alpha and p from")
    missing = [key for key in ("t", "alpha", "p") if key not in best.params]
    if missing:
        raise ConfigError(
            f"study {name} did not search {', '.join(missing)} (its trials have {sorted(best.params)}); "
            "take them from a grid or TPE study"
        )
    return {key: best.params[key] for key in ("t", "alpha", "p", "gamma") if key in best.params}
