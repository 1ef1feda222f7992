"""The paper's ablation (Table 3): baseline, KD, IG and KD+IG students, each arm × seed, with statistics.

    kdsearch ablate --study studies/cpu-quick.yaml --seeds 3 --extra-arms ig_shuffled

Every arm trains from the same teacher, IG cache, data and budget; only alpha and p (and, for the
control, the overlay's alignment) differ. Seed s of every arm shares initialisation and batch order,
so arms are compared with paired tests over seeds. The runs are an Optuna study of queued
(arm, seed) trials, so an ablation resumes, and shares workers, exactly like a grid study.

Besides accuracy, each student's **explanation agreement** with the teacher is measured on a fixed set
of test images: per image, the Spearman correlation and the top-10% IoU between the student's and the
teacher's IG maps (same baseline and steps as the training cache), averaged over the images.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from scipy import stats

from kdsearch.config import IGConfig, TrainConfig, replace
from kdsearch.data.datasets import Splits
from kdsearch.distill.attribution import BASELINES, ig_cache_fields, ig_in_calls, resolve_ig_precision
from kdsearch.errors import ConfigError
from kdsearch.infra.tensor_cache import TensorCache
from kdsearch.infra.text import number
from kdsearch.models.classifiers import CifarClassifier
from kdsearch.search.study import Objective, StudyHandle, StudyKind, best_trial, find_study
from kdsearch.search.studyfile import AblationSpec, Arm, StudySpec, check_files
from kdsearch.search.trial import TrialRunner

TOP_FRACTION = 0.1  # the IoU compares each map's top 10% of pixels


@dataclass(frozen=True)
class ArmTerms:
    """Which loss terms an arm switches on, at the ablation's T, alpha, p and gamma."""

    kd: bool
    ig: bool
    at: bool = False
    # shuffled: each image is overlaid with another image's map, so kd_ig vs ig_shuffled tests whether
    # the map's content about *this* image is what helps.
    overlay_mode: str = "aligned"

    def config(self, config: TrainConfig, spec: AblationSpec) -> TrainConfig:
        # T is set on every arm, although it only acts with alpha > 0, so all arms record the same config.
        return replace(
            config,
            kd=replace(config.kd, alpha=spec.alpha if self.kd else 0.0, temperature=spec.t),
            overlay=replace(config.overlay, p=spec.p if self.ig else 0.0, mode=self.overlay_mode),
            attention=replace(config.attention, gamma=spec.gamma if self.at else 0.0),
        )


ARMS: dict[Arm, ArmTerms] = {
    Arm.BASELINE: ArmTerms(kd=False, ig=False),
    Arm.KD: ArmTerms(kd=True, ig=False),
    Arm.IG: ArmTerms(kd=False, ig=True),
    Arm.KD_IG: ArmTerms(kd=True, ig=True),
    Arm.IG_SHUFFLED: ArmTerms(kd=True, ig=True, overlay_mode="shuffled"),
    Arm.AT: ArmTerms(kd=False, ig=False, at=True),
    Arm.IG_AT: ArmTerms(kd=False, ig=True, at=True),
    Arm.KD_AT: ArmTerms(kd=True, ig=False, at=True),
    Arm.KD_IG_AT: ArmTerms(kd=True, ig=True, at=True),
}
# Paired comparisons beyond "each arm vs baseline", made when both arms ran: what the IG overlay adds
# (with and without AT), and what AT adds to KD.
COMPARISONS = (
    (Arm.KD_IG, Arm.KD),
    (Arm.KD_IG, Arm.IG_SHUFFLED),
    (Arm.KD_AT, Arm.KD),
    (Arm.KD_IG_AT, Arm.KD_IG),
    (Arm.IG_AT, Arm.AT),
    (Arm.KD_IG_AT, Arm.KD_AT),
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
        for arm in spec.ablation.all_arms:
            arm_config(spec, arm, spec.train.seed)

    def space(self, spec: StudySpec) -> dict[str, Any]:
        space = {**vars(spec.ablation), "arms": list(spec.ablation.all_arms), "seeds": seeds(spec)}
        del space["extra_arms"]  # folded into arms
        if space["gamma"] is None:
            del space["gamma"]  # as ablations stored before the AT arms existed hold it
        return json.loads(json.dumps(space))

    def total(self, space: dict[str, Any]) -> int:
        return len(space["arms"]) * len(space["seeds"])

    def points(self, space: dict[str, Any]) -> list[dict[str, Any]]:
        # Seed-major, so a partly done ablation has every arm of its first seeds (complete pairs).
        return [{"arm": arm, "seed": seed} for seed in space["seeds"] for arm in space["arms"]]

    def trial_configs(self, spec: StudySpec, space: dict[str, Any]) -> list[TrainConfig]:
        return [arm_config(spec, arm, 0) for arm in space["arms"]]

    def objective(self, handle: StudyHandle, runner: TrialRunner) -> Objective:
        spec = handle.spec
        prepared = runner.prepared
        handle.study.set_user_attr("teacher_test_acc", prepared.teacher_metrics["teacher_test_acc"])
        probe = None
        if spec.ablation.agreement_images > 0:
            probe = AgreementProbe.build(
                prepared.inputs.teacher,
                prepared.splits,
                spec.train.ig,
                spec.ablation.agreement_images,
                spec.train.cache_dir,
            )

        def objective(trial: optuna.Trial) -> float:
            # Every arm kdsearch knows and a fixed seed range, so trials queued after the ablation grew
            # share one distribution with the earlier ones.
            arm = trial.suggest_categorical("arm", [str(arm) for arm in ARMS])
            seed = trial.suggest_int("seed", *SEED_RANGE)
            result = runner.train(
                trial,
                arm_config(spec, arm, seed),
                run_name=f"{arm}-seed{seed}",
                extra_params={"arm": arm},
                evaluate=probe.measure if probe is not None else None,
            )
            return result.val_acc

        return objective


ABLATION = AblationKind()


# --- explanation agreement ---------------------------------------------------------------------


def agreement_index(test_size: int, count: int) -> torch.Tensor:
    """A fixed, seeded sample of test images (sorted), the same for every arm, seed and worker."""
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(test_size, generator=generator)[: min(count, test_size)].sort().values


def ig_on(
    model: CifarClassifier, images: torch.Tensor, labels: torch.Tensor, splits: Splits, config: IGConfig
) -> torch.Tensor:
    """IG maps (N, H, W) float32 of ``model`` for uint8 images and their true labels, as the cache makes them."""
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # input gradients only
    maps, _ = ig_in_calls(model, images, labels, BASELINES[config.baseline](model, splits), config)
    return maps


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
    """The fixed test images and the teacher's IG maps on them (cached); measures a student against them."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_maps: torch.Tensor
    splits: Splits
    config: IGConfig

    @classmethod
    def build(
        cls, teacher: CifarClassifier, splits: Splits, config: IGConfig, count: int, cache_dir: str | Path
    ) -> AgreementProbe:
        config = resolve_ig_precision(config, next(teacher.parameters()).device)
        index = agreement_index(len(splits.test_labels), count)
        images, labels = splits.test_images[index], splits.test_labels[index]

        def build(scratch: Path):
            return {"maps": ig_on(teacher, images, labels, splits, config)}, {"images": len(index)}

        fields = {**ig_cache_fields(teacher, splits, config), "split": "test", "count": len(index)}
        maps = TensorCache(cache_dir).get_or_build("ig_agreement", fields, build).tensors["maps"]
        return cls(images, labels, maps.float(), splits, config)

    def measure(self, result) -> dict[str, float]:
        student_maps = ig_on(result.model, self.images, self.labels, self.splits, self.config)
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


@dataclass
class Comparison:
    arm: str
    reference: str
    n: int  # seeds both arms completed
    delta: float
    ci: tuple[float, float]  # 95% t-interval of the paired difference
    p_value: float


@dataclass
class AblationTable:
    teacher_test_acc: float | None
    rows: list[ArmRow]
    comparisons: list[Comparison]
    title: str

    def records(self) -> list[dict[str, Any]]:
        return [vars(row) for row in self.rows] + [{"comparison": vars(c)} for c in self.comparisons]

    def format(self) -> str:
        lines = [self.title, ""]
        header = f"{'method':<13} {'n':>2}  {'test acc %':<15} {'95% CI':<16} {'Δ vs base':>9} {'p':>7}  {'Spearman':>8} {'IoU@10%':>8}"
        lines.append(header)
        lines.append("-" * len(header))
        teacher = f"{self.teacher_test_acc:.2f}" if self.teacher_test_acc is not None else "n/a"
        lines.append(f"{'teacher':<13} {'':>2}  {teacher:<15}")
        for row in self.rows:
            base = row.arm == "baseline"
            lines.append(
                f"{row.arm:<13} {row.n:>2}  {row.mean:6.2f} ± {number(row.std, '.2f'):<6} "
                f"{_interval(row.ci):<16} {'—' if base else f'{row.delta:+.2f}':>9} "
                f"{'—' if base else number(row.p_value, '.3g'):>7}  {number(row.spearman, '.3f'):>8} {number(row.iou, '.3f'):>8}"
            )
        lines += ["", "Paired comparisons over seeds (t-test on the per-seed differences):"]
        for c in self.comparisons:
            lines.append(
                f"  {c.arm + ' vs ' + c.reference:<24} n={c.n}  Δ {c.delta:+.2f}  95% CI {_interval(c.ci, signed=True)}"
                f"  p {number(c.p_value, '.3g')}"
            )
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
            )
        )
    pairs = [(arm, "baseline") for arm in space["arms"] if arm != "baseline"]
    pairs += [pair for pair in COMPARISONS if pair[0] in accuracy and pair[1] in accuracy]
    comparisons = [Comparison(arm, ref, *_paired(accuracy[arm], accuracy[ref])) for arm, ref in pairs]
    title = (
        f"Table 3: test accuracy over {len(space['seeds'])} seed(s); "
        f"T={space['t']}, alpha={space['alpha']}, p={space['p']} (study {study.study_name})"
    )
    return AblationTable(study.user_attrs.get("teacher_test_acc"), rows, comparisons, title)


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
