"""`kdsearch export` on a smoke grid study: files, parity, model card, MLflow logged model, int8, --run-id,
and bad input (exit 2, one line, --out not created)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import onnx
import optuna
import pytest
import torch
from mlflow.models import get_model_info
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kdsearch.cli import main as cli
from kdsearch.data.datasets import load_splits
from kdsearch.models.classifiers import count_flops, count_parameters, load_model
from kdsearch.runtime import onnx_runtime
from kdsearch.runtime.onnx_runtime import onnx_logits, session
from kdsearch.search.study import best_trial
from kdsearch.track.tracking import ROLE_TAG
from tests.fakes import SMOKE, SYNTHETIC

LABEL = "tiny synthetic"


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _export_runs(uri: str) -> list:
    client = _client(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{ROLE_TAG}` = 'export'")


def _leftovers(out: Path) -> list[str]:
    """Temporary directories of an export beside ``out``."""
    return [path.name for path in out.parent.glob(f".{out.name}.*")]


# --- a smoke grid study of two points, built once with the CLI ------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory, _mlflow_template, tiny_teacher_checkpoint) -> dict:
    """studies.db and mlruns/ with a complete two-point smoke grid study "grid" (the session's tiny teacher
    stands in for the smoke study's teacher recipe)."""
    root = tmp_path_factory.mktemp("export-stores")
    (root / "mlruns").mkdir()
    shutil.copy(_mlflow_template, root / "mlruns" / "mlflow.db")
    stores = {
        "root": root,
        "storage": f"sqlite:///{root}/studies.db",
        "tracking": f"sqlite:///{root}/mlruns/mlflow.db",
        "cache": str(root / "cache"),
    }
    args = ["study", "grid", "--study", str(SMOKE), "--study-name", "grid", "--t", "1,4", "--alpha", "0.5"]
    args += ["--storage", stores["storage"], "--tracking-uri", stores["tracking"], "--cache-dir", stores["cache"]]
    args += ["--teacher-checkpoint", tiny_teacher_checkpoint, "--set", f"train.data.label={LABEL}"]
    args += ["--set", "latency.repeats=1", "--set", "latency.warmup=0", "--no-progress"]
    assert cli.main(args) == 0
    study = optuna.load_study(study_name="grid", storage=stores["storage"])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    return stores


def _export(grid: dict, out: Path, *extra: str) -> list[str]:
    args = ["export", "--out", str(out), "--storage", grid["storage"], "--tracking-uri", grid["tracking"]]
    return [*args, "--cache-dir", grid["cache"], "--warmup", "0", "--repeats", "2", *extra]


@pytest.mark.slow
def test_export_writes_a_checked_model_a_card_and_a_logged_model(grid, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "nested" / "best"
    study = optuna.load_study(study_name="grid", storage=grid["storage"])
    training_runs = {
        trial.user_attrs["run_id"]: _client(grid["tracking"]).get_run(trial.user_attrs["run_id"]).info
        for trial in study.trials
    }
    code, printed, _ = _run(capsys, _export(grid, out, "--study", "grid", "--register", "kd-student"))
    assert code == 0
    summary = json.loads(printed)
    assert sorted(path.name for path in out.iterdir()) == ["MODEL_CARD.md", "export.json", "model.onnx"]
    assert sorted(summary["files"]) == sorted(path.name for path in out.iterdir())
    assert _leftovers(out) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of a temporary directory
    assert (out / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~umask

    best = best_trial(study)
    assert best.values[0] == max(trial.values[0] for trial in study.get_trials(states=(TrialState.COMPLETE,)))
    assert (summary["study"], summary["trial"], summary["params"]) == ("grid", best.number, best.params)
    assert summary["run_id"] == best.user_attrs["run_id"] and summary["dataset"] == LABEL

    # Parity, measured again here: the ONNX file against the student of the trial's run.
    student, _ = load_model(_client(grid["tracking"]).download_artifacts(summary["run_id"], "model.pt", str(tmp_path)))
    splits = load_splits(SYNTHETIC, grid["cache"])
    with torch.no_grad():
        expected = student.eval()(splits.test_images.float() / 255)
    logits = onnx_logits(session(out / "model.onnx"), splits.test_images)
    agreement = 100.0 * (logits.argmax(1) == expected.argmax(1)).double().mean().item()
    assert agreement >= 99.9 and summary["top1_agreement"] >= 99.9
    assert summary["max_abs_logit_diff"] == pytest.approx((logits - expected).abs().max().item(), abs=1e-4)
    assert summary["max_abs_logit_diff"] < 1e-3
    assert summary["student_params"] == count_parameters(student)
    assert summary["flops"] == count_flops(student)
    assert set(summary["latency_ms"]) == {"onnx-fp32"} and set(summary["latency_ms"]["onnx-fp32"]) == {"1", "128"}
    assert all(value > 0 for value in summary["latency_ms"]["onnx-fp32"].values())
    torch_acc = 100.0 * (expected.argmax(1) == splits.test_labels).double().mean().item()
    assert summary["test_acc"]["torch"] == pytest.approx(torch_acc)

    card = (out / "MODEL_CARD.md").read_text()
    assert f"Parameters: {count_parameters(student):,}." in card
    assert f"{count_flops(student):,} (a multiply-add counts 2)" in card
    assert f"## Accuracy on the test set of {LABEL} ({len(splits.test_labels)} images)" in card
    assert f"| PyTorch fp32 | {torch_acc:.2f} |" in card
    assert "| model | batch 1 | batch 128 |" in card
    fp32_row = f"| ONNX fp32 | {summary['latency_ms']['onnx-fp32']['1']:.3f} | "
    assert fp32_row in card and "CPUExecutionProvider, 1 thread, " in card
    assert f"trial {best.number} (its best by validation accuracy) of the grid study `grid`" in card
    assert "Trial params: " + ", ".join(f"{key}={value}" for key, value in best.params.items()) in card
    assert f"`kdsearch export --study grid --format onnx --out {out} --register kd-student`" in card
    assert summary["model_uri"] in card

    client = _client(grid["tracking"])
    model = client.get_logged_model(summary["model_uri"].removeprefix("models:/"))
    assert model.status.name == "READY" and model.source_run_id == summary["export_run_id"]
    assert model.params["kd.alpha"] == "0.5"  # the training run's params travel with the model
    export_run = client.get_run(summary["export_run_id"])
    assert export_run.data.tags["mlflow.parentRunId"] == best.user_attrs["run_id"]
    assert export_run.info.status == "FINISHED"
    assert export_run.data.metrics["top1_agreement"] == summary["top1_agreement"]
    assert "MODEL_CARD.md" in {artifact.path for artifact in client.list_artifacts(summary["export_run_id"])}
    assert summary["registered"] == {"name": "kd-student", "version": "1"}
    assert client.get_model_version("kd-student", "1").source == summary["model_uri"]
    # The process-wide tracking URI is as it was (unset), so the variable chooses the store again.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", grid["tracking"])
    signature = get_model_info(summary["model_uri"]).signature
    assert signature.inputs.input_names() == ["pixels"] and signature.outputs.input_names() == ["logits"]
    for run_id, info in training_runs.items():  # the training runs are left as they were
        after = client.get_run(run_id).info
        assert (after.status, after.end_time) == (info.status, info.end_time)


@pytest.mark.slow
def test_int8_is_smaller_and_reports_its_accuracy_drop(grid, tmp_path, capsys):
    study = optuna.load_study(study_name="grid", storage=grid["storage"])
    other = next(trial for trial in study.trials if trial.number != best_trial(study).number)
    out = tmp_path / "int8"
    out.mkdir()  # an empty --out is replaced
    code, printed, _ = _run(capsys, _export(grid, out, "--study", "grid", "--trial", str(other.number), "--int8"))
    assert code == 0
    summary = json.loads(printed)
    assert (summary["trial"], summary["params"]) == (other.number, other.params)
    assert sorted(path.name for path in out.iterdir()) == [
        "MODEL_CARD.md",
        "export.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    operators = {node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    accuracy = summary["test_acc"]
    assert summary["int8_accuracy_drop"] == pytest.approx(accuracy["onnx-fp32"] - accuracy["onnx-int8"])
    assert set(summary["latency_ms"]) == {"onnx-fp32", "onnx-int8"}
    card = (out / "MODEL_CARD.md").read_text()
    assert f"| ONNX int8 | {accuracy['onnx-int8']:.2f} |" in card
    assert f"costs {summary['int8_accuracy_drop']:.2f} points of accuracy against ONNX fp32" in card
    assert f"trial {other.number} of the grid study" in card and "its best" not in card
    assert summary["registered"] is None
    artifacts = {artifact.path for artifact in _client(grid["tracking"]).list_artifacts(summary["export_run_id"])}
    assert {"MODEL_CARD.md", "model.int8.onnx"} <= artifacts


@pytest.mark.slow
def test_run_id_exports_that_runs_student(grid, tmp_path, capsys):
    study = optuna.load_study(study_name="grid", storage=grid["storage"])
    trial = study.trials[-1]
    out = tmp_path / "by-run"
    code, printed, _ = _run(capsys, _export(grid, out, "--run-id", trial.user_attrs["run_id"]))
    assert code == 0
    summary = json.loads(printed)
    assert summary["run_id"] == trial.user_attrs["run_id"]
    assert (summary["study"], summary["trial"], summary["params"]) == ("grid", trial.number, trial.params)
    assert (out / "model.onnx").is_file() and summary["top1_agreement"] >= 99.9
    model = _client(grid["tracking"]).get_logged_model(summary["model_uri"].removeprefix("models:/"))
    assert model.name == f"grid-trial-{trial.number}"
    assert f"--run-id {trial.user_attrs['run_id']}" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_failed_parity_exits_2_and_leaves_nothing(grid, tmp_path, capsys, monkeypatch):
    real_export = onnx_runtime.export_onnx

    def export_a_different_model(model, path, *args, **kwargs):
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.classifier[1].bias.copy_(
                torch.randn(wrong.classifier[1].bias.shape, generator=torch.Generator().manual_seed(0)) * 50
            )
        return real_export(wrong, path, *args, **kwargs)

    monkeypatch.setattr(onnx_runtime, "export_onnx", export_a_different_model)
    before = len(_export_runs(grid["tracking"]))
    out = tmp_path / "parent" / "refused"
    code, printed, err = _run(capsys, _export(grid, out, "--study", "grid"))
    assert code == 2 and printed == ""
    assert err.startswith("error: parity check failed: the ONNX model agrees with PyTorch on ") and err.count("\n") == 1
    agreement = float(err.split(" on ")[1].split(" %")[0])
    assert agreement < 99.9
    assert not out.exists() and not out.parent.exists() and _leftovers(out) == []
    assert len(_export_runs(grid["tracking"])) == before


# --- bad input: cheap fake_stores made directly with Optuna and MLflow ---------------------------------


@pytest.fixture(scope="module")
def fake_stores(tmp_path_factory, _mlflow_template) -> dict:
    """A single-objective study "single" (trial 0 complete with a run that does not exist, 1 failed,
    2 pruned), a two-objective study "front", and an MLflow run without a student; nothing is written to
    them by the tests that use them."""
    root = tmp_path_factory.mktemp("fake-stores")
    (root / "mlruns").mkdir()
    shutil.copy(_mlflow_template, root / "mlruns" / "mlflow.db")
    storage, mlflow_uri = f"sqlite:///{root}/studies.db", f"sqlite:///{root}/mlruns/mlflow.db"
    space = {"t": FloatDistribution(1.0, 8.0)}
    single = optuna.create_study(study_name="single", storage=storage, direction="maximize")
    single.add_trial(create_trial(params={"t": 2.0}, distributions=space, value=50.0, user_attrs={"run_id": "gone"}))
    single.add_trial(create_trial(params={"t": 3.0}, distributions=space, state=TrialState.FAIL))
    single.add_trial(create_trial(params={"t": 4.0}, distributions=space, state=TrialState.PRUNED))
    front = optuna.create_study(study_name="front", storage=storage, directions=["maximize", "minimize"])
    for accuracy, latency in ((60.0, 2.0), (50.0, 1.0), (40.0, 3.0)):
        front.add_trial(create_trial(params={"t": 2.0}, distributions=space, values=[accuracy, latency]))
    client = _client(mlflow_uri)
    run = client.create_run(client.create_experiment("bare"), run_name="no-student")
    client.set_terminated(run.info.run_id)
    return {"storage": storage, "tracking": mlflow_uri, "bare_run": run.info.run_id}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "single", "--format", "tflite"], "Invalid value for '--format'"),
        (["--study", "single", "--trial", "1"], "trial 1 of study 'single' is FAIL, not COMPLETE"),
        (["--study", "single", "--trial", "2"], "trial 2 of study 'single' is PRUNED, not COMPLETE"),
        (["--study", "single", "--trial", "7"], "study 'single' has no trial 7; its trials: [0, 1, 2]"),
        (["--study", "single"], "no MLflow run 'gone' in "),
        (["--study", "front"], "choose a trial with --trial, or --within POINTS for the fastest of its front"),
        (["--study", "front"], "(its Pareto front: trials [0, 1])"),
        (["--study", "single", "--within", "1"], "study 'single' has one objective: --within is for a Pareto study"),
        (["--study", "front", "--within", "-1"], "--within must be in [0, 100] points but got -1.0"),
        (["--study", "front", "--trial", "0", "--within", "1"], "--within picks a trial of a Pareto --study"),
        (["--study", "front", "--within", "10"], "trial 1 of study 'front'"),  # 50 % at 1 ms: within 10 of 60 %
        (["--study", "nope"], "no study 'nope' in "),
        (["--run-id", "0123456789abcdef"], "no MLflow run '0123456789abcdef' in "),
        (["--run-id", "BARE"], "has no config.json or model.pt: only a completed trial's run holds its student"),
        (["--study", "single", "--run-id", "BARE"], "give exactly one of --study NAME or --run-id ID"),
        ([], "give exactly one of --study NAME or --run-id ID"),
        (["--run-id", "BARE", "--trial", "0"], "--trial selects a trial of --study"),
        (["--study", "single", "--trial", "-1"], "--trial must be >= 0 but got -1"),
        (["--study", "single", "--register", " "], "--register needs a model name"),
        (["--study", "single", "--register", "a/b:c"], "--register 'a/b:c': Invalid model name 'a/b:c'"),
        (["--study", "single", "--tracking-uri", "sqlite:///TMP/mlruns/other.db"], "no such file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(fake_stores, tmp_path, capsys, args, message):
    out = tmp_path / "new" / "export"
    args = [arg.replace("BARE", fake_stores["bare_run"]).replace("TMP", str(tmp_path)) for arg in args]
    base = ["export", "--out", str(out), "--storage", fake_stores["storage"], "--tracking-uri", fake_stores["tracking"]]
    code, printed, err = _run(capsys, [*base, *args])
    assert code == 2 and printed == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() and not out.parent.exists()
    assert _export_runs(fake_stores["tracking"]) == []


@pytest.mark.parametrize("under", ["a file", "/proc"])
def test_an_out_that_cannot_be_created_is_refused_before_the_export(fake_stores, tmp_path, capsys, under):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "export" if under == "a file" else Path("/proc/kdsearch-export")
    args = ["export", "--out", str(out), "--study", "single", "--storage", fake_stores["storage"]]
    code, _, err = _run(capsys, [*args, "--tracking-uri", fake_stores["tracking"]])
    assert code == 2 and err.count("\n") == 1
    assert f"error: --out {out} cannot be created: {out.parent} is " in err
    assert _export_runs(fake_stores["tracking"]) == []


@pytest.mark.parametrize("existing", ["file", "full directory"])
def test_an_out_that_is_a_file_or_not_empty_is_refused_and_kept(fake_stores, tmp_path, capsys, existing):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("keep me")
        message = f"--out {out} is a file; give a directory"
    else:
        out.mkdir()
        (out / "model.onnx").write_text("keep me")
        message = f"--out {out} already exists and is not empty"
    args = ["export", "--out", str(out), "--study", "single", "--storage", fake_stores["storage"]]
    code, _, err = _run(capsys, [*args, "--tracking-uri", fake_stores["tracking"]])
    assert code == 2 and message in err and err.count("\n") == 1
    kept = out if existing == "file" else out / "model.onnx"
    assert kept.read_text() == "keep me" and _leftovers(out) == []
