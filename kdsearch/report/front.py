"""The report of a Pareto study: its front as a table and a figure, with the teacher in the same runtime.

The front's students are rebuilt from their MLflow checkpoints (a pruned student's channels are in its
stored config) and timed with the teacher, their passes interleaved (``runtime.timing.interleaved_latency``,
not cached: every speed-up is a ratio of timings taken together), in the study's objective runtime and
its ONNX runtimes (by default fp32 and int8), at the objective's batch and threads. An int8 student's
test accuracy is measured here, on the study's test split, because quantisation changes it. The paper's
student is timed with them wherever it lies; other dominated trials keep the latency their trial measured. In a multi-fidelity study the figure also shows the
candidates stopped at each rung, at that rung's validation accuracy, beside the paper's student's after
the same epochs: "within a point" is then read at equal training.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
import torch
from optuna.trial import TrialState

from kdsearch.config import Runtime
from kdsearch.data.datasets import Splits, load_splits
from kdsearch.distill.teacher import cached_teacher_accuracy, load_teacher
from kdsearch.errors import KdsearchError
from kdsearch.infra.text import ACCURACY
from kdsearch.models.classifiers import count_flops, count_parameters, load_model
from kdsearch.report.tables import Table
from kdsearch.runtime.onnx_runtime import onnx_logits, session
from kdsearch.runtime.timing import CALIBRATION_IMAGES, Exported, interleaved_latency
from kdsearch.search.rungs import STOPPED_ATTR, rung_accuracies
from kdsearch.search.study import front
from kdsearch.search.studyfile import StudySpec

PAPER_STUDENT = {"student_drop": 5, "width": 1.0, "prune_ratio": 0.0}  # the paper's student, as Pareto params


@dataclass
class Point:
    """One student (or the teacher) on the accuracy × latency plane."""

    name: str
    params: dict[str, Any]
    parameters: int
    flops: int
    latency_ms: dict[str, float]  # by runtime, at the study's batch and threads
    val_acc: float | None
    test_acc: float | None
    int8_test_acc: float | None
    on_front: bool
    rung_val_acc: dict[int, float] = field(default_factory=dict)  # multi-fidelity: after each rung's epochs
    paper: bool = False  # the paper's student: as Pareto params, or a named student of its architecture

    def __post_init__(self) -> None:
        self.paper = self.paper or self.params == PAPER_STUDENT


@dataclass
class StoppedCandidate:
    """A multi-fidelity candidate stopped at a rung: its latency and its validation accuracy there."""

    name: str
    params: dict[str, Any]
    latency_ms: float  # the study's own timing
    stopped_at: int  # epochs
    rung_val_acc: dict[int, float]  # after each rung it reached

    @property
    def val_acc(self) -> float:
        """At the rung it stopped after."""
        return self.rung_val_acc[self.stopped_at]


@dataclass
class ParetoResult:
    runtime: str
    batch: int
    threads: int
    teacher: Point | None
    students: list[Point]  # every complete trial; the front's with int8 numbers
    stopped: list[StoppedCandidate] = field(default_factory=list)
    # The test accuracy a student that learned nothing may still show: the most frequent test class's share
    # plus two binomial standard errors over the test images (chance_ceiling); None where not measured.
    chance_test_acc: float | None = None


def chance_ceiling(labels: torch.Tensor) -> float:
    """Test accuracy (%) up to which a classifier is indistinguishable from always naming the most frequent
    class: its share plus two binomial standard errors over ``len(labels)`` images."""
    share = float(torch.bincount(labels).max()) / len(labels)
    return 100.0 * (share + 2.0 * math.sqrt(share * (1.0 - share) / len(labels)))


def stopped_candidates(trials: list[optuna.trial.FrozenTrial]) -> list[StoppedCandidate]:
    """The trials stopped at a rung that trained (a repeated point's twin already counts)."""
    return [
        StoppedCandidate(
            f"trial {trial.number}",
            dict(trial.params),
            trial.user_attrs["latency_ms"],
            trial.user_attrs[STOPPED_ATTR],
            rung_accuracies(trial.user_attrs),
        )
        for trial in trials
        if trial.state == TrialState.PRUNED
        and trial.user_attrs.get(STOPPED_ATTR) in rung_accuracies(trial.user_attrs)
        and "same_as_trial" not in trial.user_attrs
    ]


def _runtimes(spec: StudySpec) -> list[str]:
    # The objective's runtime first; the front is also shown in every ONNX runtime the study times
    # (latency.onnx_runtimes; by default fp32 and int8).
    return list(dict.fromkeys([spec.pareto.latency, *spec.latency.onnx_runtimes]))


def _student(
    client,
    trial: optuna.trial.FrozenTrial,
    on_front: bool,
    spec: StudySpec,
    splits: Splits,
    repeats: list[int],
    scratch: Path,
) -> tuple[Point, Exported]:
    """The trial's point, with the study's own latency, and its ONNX files in ``scratch``, written when
    they are timed (later, with the teacher); a front student (and the paper's, the reference every
    speed-up is read against) also its int8 test accuracy where the study times int8."""
    run_id = trial.user_attrs["run_id"]
    scratch.mkdir()
    model, _ = load_model(client.download_artifacts(run_id, "model.pt", str(scratch)))
    model.eval()
    int8_test_acc = None
    exported = Exported(model, splits.train_images[:CALIBRATION_IMAGES], scratch)
    paper = trial.params == PAPER_STUDENT or _names_the_paper_student(trial.params, spec)
    if on_front or paper:
        if Runtime.ONNX_INT8.value in _runtimes(spec):
            logits = onnx_logits(session(exported.path(Runtime.ONNX_INT8)), splits.test_images)
            int8_test_acc = 100.0 * float((logits.argmax(dim=1) == splits.test_labels).float().mean())
    point = Point(
        name=f"trial {trial.number}" + (f" (also {', '.join(map(str, repeats))})" if repeats else ""),
        params=dict(trial.params),
        parameters=count_parameters(model),
        flops=count_flops(model),
        latency_ms={spec.pareto.latency: trial.values[1]},
        val_acc=trial.values[0],
        test_acc=trial.user_attrs.get("test_acc"),
        int8_test_acc=int8_test_acc,
        on_front=on_front,
        rung_val_acc=rung_accuracies(trial.user_attrs),
        paper=paper,
    )
    return point, exported


def _names_the_paper_student(params: dict[str, Any], spec: StudySpec) -> bool:
    """A study of named students: whether ``params`` name the one built as the paper's student (as Pareto
    params, ``Point`` recognises it itself)."""
    named = spec.students.get(params.get("student"))
    return named is not None and (named.arch, named.drop_blocks, named.width_mult, named.channels) == (
        "mobilenetv2_cifar",
        5,
        1.0,
        None,
    )


def pareto_result(study: optuna.Study, spec: StudySpec, client) -> ParetoResult:
    """Every complete trial, the front's students and the teacher timed together in each runtime; raises
    KdsearchError when the data or the teacher are not on this machine."""
    if not Path(spec.train.teacher_checkpoint).is_file():
        raise KdsearchError(
            f"teacher {spec.train.teacher_checkpoint} is not on this machine (give --teacher-checkpoint)"
        )
    splits = load_splits(spec.train.data, spec.train.cache_dir)
    teacher = load_teacher(spec.train, splits.num_classes, torch.device("cpu"))
    on_front = {trial.number for trial in front(study)}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "run_id" in t.user_attrs]
    # A point proposed again reused its twin's student (pareto.py): one student, listed under its first trial.
    numbers = {trial.number for trial in complete}
    repeats: dict[int, list[int]] = {}
    for trial in complete:
        if trial.user_attrs.get("same_as_trial") in numbers:
            repeats.setdefault(trial.user_attrs["same_as_trial"], []).append(trial.number)
    teacher_point = Point(
        name="teacher",
        params={},
        parameters=count_parameters(teacher),
        flops=count_flops(teacher),
        latency_ms={},
        val_acc=None,
        test_acc=cached_teacher_accuracy(teacher, splits, spec.train.cache_dir, torch.device("cpu")),
        int8_test_acc=None,
        on_front=False,
    )
    with tempfile.TemporaryDirectory() as scratch:
        students = [
            _student(
                client,
                trial,
                trial.number in on_front,
                spec,
                splits,
                repeats.get(trial.number, []),
                Path(scratch) / f"trial-{trial.number}",
            )  # fmt: skip
            for trial in complete
            if trial.user_attrs.get("same_as_trial") not in numbers
        ]
        teacher_exported = Exported(teacher, splits.train_images[:CALIBRATION_IMAGES], scratch)
        for runtime in _runtimes(spec):
            # Every trained student in the objective's runtime, so that no point of the figure keeps a timing
            # taken minutes or days apart from the others (they drifted 16 % on this VM between renders); the
            # front and the paper's student also in the other runtimes.
            timed = [(teacher_point, teacher_exported)] + [
                (point, exported)
                for point, exported in students
                if runtime == spec.pareto.latency or point.on_front or point.paper
            ]
            medians, _ = interleaved_latency(
                [exported for _, exported in timed], runtime, spec.pareto.batch, spec.pareto.threads, spec.latency
            )
            for (point, _), median in zip(timed, medians, strict=True):
                point.latency_ms[runtime] = median
    points = [point for point, _ in students]
    stopped = stopped_candidates(study.get_trials(deepcopy=False))
    return ParetoResult(
        spec.pareto.latency,
        spec.pareto.batch,
        spec.pareto.threads,
        teacher_point,
        points,
        stopped,
        chance_ceiling(splits.test_labels),
    )


def _architecture(params: dict[str, Any]) -> str:
    if not params:
        return "teacher"
    if "student" in params:  # a named student of the study's students
        return str(params["student"])
    text = f"drop {params.get('student_drop', 0)}, width {params.get('width', 1.0):g}"
    ratio = params.get("prune_ratio", 0.0)
    stages = [params[key] for key in sorted(params) if key.startswith("stage_ratio_")]
    if any(stages):
        text += f", pruned {'/'.join(f'{100 * r:.0f}' for r in stages)} % by stage"
    elif ratio:
        text += f", pruned {ratio:.0%}"
    extras = [f"{name} {params[name]}" for name in ("importance", "recovery") if name in params]
    if ratio or any(stages):  # how it was pruned; an unpruned candidate ignores these
        extras += [f"in {params['prune_steps']} steps"] if params.get("prune_steps", 1) > 1 else []
        extras += [f"sparsity {params['sparsity']:g}"] if params.get("sparsity", 0) > 0 else []
    return ", ".join([text, *extras])


def rungs_table(result: ParetoResult, dataset: str) -> Table | None:
    """Multi-fidelity: every trained candidate's validation accuracy after each rung it reached, its
    latency and where it stopped, the paper's student first (the reference at equal epochs); None for a
    study without rungs."""
    finished = [point for point in result.students if point.rung_val_acc]
    if not finished and not result.stopped:
        return None
    ends = sorted(
        {epochs for point in finished for epochs in point.rung_val_acc} | {c.stopped_at for c in result.stopped}
    )
    rows = []
    for point in sorted(finished, key=lambda point: not point.paper):
        reference = " (paper's student)" if point.paper else ""
        rows.append(
            {"candidate": point.name + reference, "architecture": _architecture(point.params)}
            | {f"val acc after {epochs} ep": point.rung_val_acc.get(epochs) for epochs in ends}
            | {f"latency (ms), {result.runtime}": point.latency_ms[result.runtime], "stopped after (epochs)": None}
        )
    for candidate in sorted(result.stopped, key=lambda candidate: (-candidate.stopped_at, -candidate.val_acc)):
        rows.append(
            {"candidate": candidate.name, "architecture": _architecture(candidate.params)}
            | {f"val acc after {epochs} ep": candidate.rung_val_acc.get(epochs) for epochs in ends}
            | {f"latency (ms), {result.runtime}": candidate.latency_ms, "stopped after (epochs)": candidate.stopped_at}
        )
    formats = {f"val acc after {epochs} ep": ACCURACY for epochs in ends}
    formats |= {f"latency (ms), {result.runtime}": ".3f", "stopped after (epochs)": ".0f"}
    note = (
        "Multi-fidelity rungs: each candidate's validation accuracy at the end of every rung it reached (one "
        "schedule of the last rung's epochs), and the rung after which it was not promoted. Latency: the front's "
        "and the paper's student's as timed again with the teacher (the front table), the others' as the study "
        "measured them."
    )
    return Table("rungs", f"Rungs of the multi-fidelity search, {dataset}", pd.DataFrame(rows), formats, [note])


def students_table(result: ParetoResult, dataset: str) -> Table | None:
    """A study of named students (``pareto.students``): every trained student, fastest first, with the
    latencies measured here together with the teacher's, and which ones no faster student beats in test
    accuracy: the family that wins at each latency, unless it is at chance level (one that did not train would
    otherwise win below every other). None for a study of built-in architectures."""
    students = [point for point in result.students if "student" in point.params]
    if not students:
        return None
    runtime = result.runtime
    students.sort(key=lambda point: point.latency_ms[runtime])
    chance = result.chance_test_acc if result.chance_test_acc is not None else -math.inf
    records, best = [], chance
    for point in students:
        wins = point.test_acc is not None and point.test_acc > best
        best = max(best, point.test_acc if point.test_acc is not None else -math.inf)
        at_chance = point.test_acc is not None and point.test_acc <= chance
        records.append(
            {
                "student": point.name,
                "architecture": _architecture(point.params) + (" (paper's student)" if point.paper else ""),
                "params": point.parameters,
                "MFLOPs": point.flops / 1e6,
                f"{runtime} ms": point.latency_ms[runtime],
                f"{runtime} speed-up": result.teacher.latency_ms[runtime] / point.latency_ms[runtime],
                "val acc (%)": point.val_acc,
                "test acc (%)": point.test_acc,
                "best up to this latency": "yes" if wins else ("chance level" if at_chance else ""),
            }
        )
    formats = {"params": ",.0f", "MFLOPs": ".1f", f"{runtime} ms": ".3f", f"{runtime} speed-up": ".2f"}
    formats |= {"val acc (%)": ACCURACY, "test acc (%)": ACCURACY}
    note = (
        f"{dataset}. Every trained student, timed here together with the teacher ({runtime}, batch "
        f"{result.batch}, {result.threads} thread(s)), fastest first; 'best up to this latency': no faster "
        "student reaches its test accuracy (the front in test accuracy and this timing)."
    )
    if result.chance_test_acc is not None:
        note += (
            f" 'chance level': test accuracy at most {result.chance_test_acc:.2f} %, the most frequent test class's "
            "share plus two binomial standard errors, which a student that learned nothing reaches; it wins nowhere."
        )
    return Table("students", "Students: which one wins at which latency", pd.DataFrame(records), formats, [note])


def front_table(result: ParetoResult, dataset: str) -> Table:
    """The front's students (and the teacher and the paper's student when it ran), one row each."""
    runtimes = list(result.teacher.latency_ms)
    int8 = Runtime.ONNX_INT8.value in runtimes
    rows = [result.teacher] + sorted(
        (point for point in result.students if point.on_front or point.paper),
        key=lambda point: point.latency_ms[result.runtime],
    )
    records = []
    for point in rows:
        record = {
            "student": point.name + (" (paper's student)" if point.paper else ""),
            "architecture": _architecture(point.params),
            "params": point.parameters,
            "MFLOPs": point.flops / 1e6,
        }
        for runtime in runtimes:
            latency = point.latency_ms.get(runtime)
            record[f"{runtime} ms"] = latency
            record[f"{runtime} speed-up"] = result.teacher.latency_ms[runtime] / latency if latency else None
        record |= {"val acc (%)": point.val_acc, "test acc (%)": point.test_acc}
        if int8:
            record["int8 test acc (%)"] = point.int8_test_acc
        record["on front"] = "yes" if point.on_front else ""
        records.append(record)
    formats = {"params": ",.0f", "MFLOPs": ".1f", "val acc (%)": ACCURACY, "test acc (%)": ACCURACY}
    formats["int8 test acc (%)"] = ACCURACY
    formats |= {f"{runtime} ms": ".3f" for runtime in runtimes} | {f"{runtime} speed-up": ".2f" for runtime in runtimes}
    notes = [
        f"{dataset}. Latency: median ms of one batch of {result.batch} at {result.threads} thread(s), on this "
        "machine; speed-up is against the teacher in the same runtime. The study's objective runtime is "
        f"{result.runtime}; the front is Pareto-optimal in validation accuracy and that latency as the study "
        "measured it; every trained student is timed again here, together with the teacher, and shown so.",
    ]
    if int8:
        notes.append("int8: static QDQ quantisation calibrated on training images; its test accuracy is measured here.")
    return Table("pareto_front", "Pareto front: accuracy × latency", pd.DataFrame.from_records(records), formats, notes)


def front_figure(result: ParetoResult, dataset: str, progress: str = "") -> go.Figure:
    """Validation and test accuracy against latency; the front bold, dominated trials faded, the teacher
    and the paper's student marked, the front's int8 students beside their fp32 selves."""
    runtime = result.runtime
    figure = go.Figure()
    for on_front, opacity in ((False, 0.3), (True, 1.0)):
        points = [point for point in result.students if point.on_front == on_front]
        points.sort(key=lambda point: point.latency_ms[runtime])
        label = "front" if on_front else "dominated"
        for metric, symbol in (("val_acc", "circle"), ("test_acc", "diamond")):
            figure.add_scatter(
                x=[point.latency_ms[runtime] for point in points],
                y=[getattr(point, metric) for point in points],
                mode="lines+markers" if on_front and metric == "val_acc" else "markers",
                marker={"symbol": symbol, "size": 10},
                opacity=opacity,
                name=f"{label}: {metric.replace('_acc', '')} acc ({runtime})",
                text=[f"{point.name}: {_architecture(point.params)}" for point in points],
                meta={"role": label, "metric": metric},
            )
    front = [point for point in result.students if point.on_front and point.int8_test_acc is not None]
    if runtime != Runtime.ONNX_INT8 and front:
        figure.add_scatter(
            x=[point.latency_ms[Runtime.ONNX_INT8.value] for point in front],
            y=[point.int8_test_acc for point in front],
            mode="markers",
            marker={"symbol": "x", "size": 11},
            name="front: test acc, int8 (onnx-int8 latency)",
            text=[point.name for point in front],
            meta={"role": "int8", "metric": "test_acc"},
        )
    figure.add_scatter(
        x=[result.teacher.latency_ms[runtime]],
        y=[result.teacher.test_acc],
        mode="markers+text",
        marker={"symbol": "star", "size": 16, "color": "black"},
        text=["teacher"],
        textposition="top center",
        name=f"teacher: test acc ({runtime})",
        meta={"role": "teacher", "metric": "test_acc"},
    )
    paper = [point for point in result.students if point.paper]
    _add_rungs(figure, result, paper[0] if paper else None)
    if paper:
        figure.add_scatter(
            x=[paper[0].latency_ms[runtime]],
            y=[paper[0].test_acc],
            mode="markers+text",
            marker={"symbol": "square", "size": 14, "color": "red"},
            text=["paper's student"],
            textposition="bottom center",
            name="paper's student: test acc",
            meta={"role": "paper", "metric": "test_acc"},
        )
    title = f"Accuracy vs latency ({runtime}, batch {result.batch}, {result.threads} thread(s)), {dataset}"
    figure.update_layout(
        title=title + (f"<br>({progress})" if progress else ""),
        xaxis_title=f"latency (ms), {runtime}",
        yaxis_title="accuracy (%)",
    )
    return figure


def _add_rungs(figure: go.Figure, result: ParetoResult, paper: Point | None) -> None:
    """Multi-fidelity: the candidates stopped at each rung (validation accuracy there, open markers), and
    the paper's student's validation accuracy after each rung's epochs (dotted lines), so that every
    candidate is read against the reference at the same training."""
    for epochs in sorted({candidate.stopped_at for candidate in result.stopped}):
        stopped = [candidate for candidate in result.stopped if candidate.stopped_at == epochs]
        figure.add_scatter(
            x=[candidate.latency_ms for candidate in stopped],
            y=[candidate.val_acc for candidate in stopped],
            mode="markers",
            marker={"symbol": "circle-open", "size": 9},
            opacity=0.6,
            name=f"stopped after {epochs} epoch(s): val acc (latency as the study timed it)",
            text=[f"{candidate.name}: {_architecture(candidate.params)}" for candidate in stopped],
            meta={"role": "stopped", "metric": "val_acc", "epochs": epochs},
        )
    if paper is None:
        return
    for epochs, val_acc in paper.rung_val_acc.items():
        figure.add_hline(
            y=val_acc,
            line={"dash": "dot", "width": 1, "color": "red"},
            annotation_text=f"paper's student, {epochs} epoch(s): val {val_acc:.2f}",
            annotation_position="bottom right",
        )


def optuna_front(study: optuna.Study) -> go.Figure:
    import optuna.visualization as visualization

    figure = visualization.plot_pareto_front(study, target_names=["val acc (%)", "latency (ms)"])
    figure.update_layout(title=f"Optuna Pareto front of {study.study_name}")
    return figure
