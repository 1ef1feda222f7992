"""Errors a user can fix: one line on stderr, exit code 2, and nothing written (README, "Using it").

Each case runs the real command in-process. "Nothing written" means no study storage, no MLflow store,
no run directory and no cache folder, not even an empty one.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdsearch.cli.main import main
from kdsearch.config import ModelConfig
from kdsearch.models.classifiers import build_model
from tests.fakes import SMOKE, interruptible

TRAIN = ["train", "--arch", "tiny_cnn", "--student-drop", "1", "--epochs", "1", "--batch-size", "32"]
NO_TEACHER = ["--alpha", "0", "--p", "0"]


def _fails_cleanly(capsys, args, message, *unwritten: Path) -> str:
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    for path in unwritten:
        assert not path.exists() or (path.is_dir() and not any(path.iterdir())), f"{path} was written"
    return err


def _images(directory: Path, count: int, size: int = 32, start: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(start)
    for index in range(start, start + count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(directory / f"{index:04d}.jpg", quality=90)


def _folder(root: Path, classes=("cat", "dog"), per_class: int = 4) -> Path:
    for split in ("train", "test"):
        for name in classes:
            _images(root / split / name, per_class)
    return root


# --- studies: the study is never created -------------------------------------------------------------


@pytest.fixture
def study(tmp_path, capsys):
    """Run ``study grid`` on the smoke study with extra flags; assert the failure left no study behind."""
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    workdir.mkdir()

    def run(extra: list, message: str) -> None:
        args = ["study", "grid", "--study", SMOKE, "--workdir", workdir, "--cache-dir", cache, *extra]
        _fails_cleanly(capsys, args, message, workdir, cache)
        _fails_cleanly(capsys, ["study", "status", "--workdir", workdir], "no study has been created there")

    return run


def _teacher_file(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    return path


def test_study_refuses_a_teacher_of_another_architecture(study, tmp_path):
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}
    study(
        ["--teacher-checkpoint", _teacher_file(tmp_path, resnet_like)],
        "does not fit tiny_cnn (drop_blocks=0, width=1.0, classes=10): 26 missing key(s)",
    )


def test_study_refuses_a_teacher_with_another_class_count(study, tmp_path):
    three_classes = build_model(ModelConfig(arch="tiny_cnn", num_classes=3)).state_dict()
    study(
        ["--teacher-checkpoint", _teacher_file(tmp_path, three_classes)],
        "classifier.1.weight has shape (3, 32) in the checkpoint, (10, 32) in the model",
    )


def _flat(root: Path) -> None:
    _images(root, 4)


def _no_classes(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()


def _test_classes_differ(root: Path) -> None:
    _folder(root)
    (root / "test" / "dog").rename(root / "test" / "bird")


def _mixed_sizes(root: Path) -> None:
    _folder(root)
    _images(root / "train" / "dog", 1, size=48, start=-1)  # sorts first: the one whose header is read


def _empty_class(root: Path) -> None:
    _folder(root)
    (root / "train" / "eel").mkdir()
    (root / "test" / "eel").mkdir()
    (root / "train" / "eel" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_flat, "must contain train/ and test/ subfolders"),
        (_no_classes, "train has no class subfolders"),
        (_test_classes_differ, "test has other classes than train/: missing ['dog'], extra ['bird']"),
        (_mixed_sizes, "differ in size"),
        (_empty_class, "class folder {root}/train/eel has no images"),
    ],
)
def test_study_refuses_a_folder_dataset_it_cannot_train_on(study, tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    flags = ["--set", "train.data.dataset=folder", "--data-dir", root, "--set", "train.data.val_size=2"]
    study(flags, message.format(root=root))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.data.train_subset=400"], "train_subset 400 (--train-subset) exceeds the 300 training images"),
        (["train.data.train_subset=5"], "train_subset 5 (--train-subset) is smaller than the 10 classes"),
        (["train.data.val_size=400"], "val_size 400 (--val-size) must be smaller than the 400 training images"),
    ],
)
def test_study_refuses_split_sizes_the_data_cannot_give(study, sets, message):
    study([arg for item in sets for arg in ("--set", item)], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_study_refuses_cuda_without_a_gpu(study):
    study(["--device", "cuda"], "device cuda was asked for but CUDA is not available")


def test_study_refuses_a_dataset_it_cannot_download(study, tmp_path, monkeypatch):
    import torchvision

    # Nothing listens on port 1: the request fails at once, as it does without a network.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:1/cifar-10-python.tar.gz")
    empty = tmp_path / "downloads"
    empty.mkdir()
    study(
        ["--set", "train.data.dataset=cifar10", "--data-dir", empty],
        f"cifar10 is not in {empty} and cannot be downloaded from http://127.0.0.1:1/",
    )


def test_study_refuses_a_cache_dir_it_cannot_create(study, tmp_path):
    (tmp_path / "a-file").write_text("")
    study(["--set", f"train.cache_dir={tmp_path / 'a-file' / 'cache'}"], f"{tmp_path / 'a-file'} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_study_refuses_a_read_only_workdir(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o555)
    args = ["study", "grid", "--study", SMOKE, "--workdir", workdir, "--cache-dir", tmp_path / "cache"]
    _fails_cleanly(capsys, args, "is not writable", workdir, tmp_path / "cache")


# --- single runs: no run dir, no cache ------------------------------------------------------------------


def test_corrupt_jpeg_is_named_and_leaves_no_partial_cache(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    broken = root / "train" / "dog" / "0002.jpg"  # not the first of its class: only decoding finds it
    broken.write_bytes(broken.read_bytes()[:200])
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [*TRAIN, *NO_TEACHER, "--dataset", "folder", "--data-dir", root, "--val-size", "2"]
    args += ["--cache-dir", cache, "--run-dir", run_dir]
    _fails_cleanly(capsys, args, f"cannot decode image {broken}: Image is incomplete or truncated", cache, run_dir)
    assert not cache.exists()


@pytest.mark.parametrize("flag", ["--run-dir", "--cache-dir"])
def test_train_refuses_a_folder_it_cannot_write(tmp_path, capsys, flag):
    (tmp_path / "a-file").write_text("")
    other = {"--run-dir": ["--cache-dir", tmp_path / "cache"], "--cache-dir": ["--run-dir", tmp_path / "run"]}[flag]
    args = [*TRAIN, *NO_TEACHER, "--dataset", "synthetic", "--val-size", "100", flag, tmp_path / "a-file", *other]
    err = _fails_cleanly(capsys, args, f"{tmp_path / 'a-file'} is a file, not a folder", *other[1:])
    assert flag in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_train_refuses_a_read_only_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o555)
    args = [*TRAIN, *NO_TEACHER, "--dataset", "synthetic", "--val-size", "100", "--run-dir", run_dir]
    _fails_cleanly(capsys, [*args, "--cache-dir", tmp_path / "cache"], "is not writable", tmp_path / "cache")


def test_train_on_synthetic_names_the_flags_its_defaults_need(tmp_path, capsys, tiny_teacher_checkpoint):
    base = ["train", "--dataset", "synthetic", "--arch", "tiny_cnn", "--run-dir", tmp_path / "run"]
    _fails_cleanly(capsys, base, "(--teacher-checkpoint)", tmp_path / "run")
    base += ["--teacher-checkpoint", tiny_teacher_checkpoint]
    _fails_cleanly(capsys, base, "val_size 5000 (--val-size) must be smaller than the 1200", tmp_path / "run")
    base += ["--val-size", "100"]
    _fails_cleanly(capsys, base, "would remove all 4 feature blocks of tiny_cnn (--student-drop)", tmp_path / "run")


def test_train_refuses_a_missing_teacher_before_decoding_data(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    args = [*TRAIN, "--dataset", "folder", "--data-dir", root, "--val-size", "2", "--cache-dir", tmp_path / "cache"]
    args += ["--teacher-checkpoint", tmp_path / "nope.pt"]
    _fails_cleanly(capsys, args, f"teacher checkpoint {tmp_path / 'nope.pt'} does not exist", tmp_path / "cache")


# --- the smaller ones ------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="the MySQL driver is installed")
def test_mysql_storage_without_its_driver_names_the_driver_not_the_postgres_extra():
    from kdsearch.errors import StudyError
    from kdsearch.infra.storage import check_database

    with pytest.raises(StudyError, match=r"needs the MySQLdb driver.*pip install mysqlclient") as raised:
        check_database("mysql://user:pw@localhost/db")
    assert "postgres" not in str(raised.value) and "pw" not in str(raised.value)


def test_ui_on_a_port_in_use_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # `ui` handles SIGTERM: not in pytest's process
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["ui", "--tracking-uri", f"sqlite:///{store}", "--port", port]
        _fails_cleanly(capsys, args, f"--port {port} is in use on 127.0.0.1")


def test_ui_removes_its_log_folder_when_it_stops(tmp_path):
    from kdsearch.serve.mlflow_ui import UIServer

    log_path = tmp_path / "kdsearch-ui-x" / "mlflow-ui.log"
    log_path.parent.mkdir()
    log_path.write_text("started")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    with UIServer("http://127.0.0.1:1", process, log_path, tracking_uri="sqlite:///x.db"):
        pass
    assert process.poll() is not None and not log_path.parent.exists()


@pytest.mark.slow
def test_teacher_train_without_validation_prints_valid_json(tmp_path, capsys):
    out = tmp_path / "teacher.pt"
    args = ["teacher", "train", "--dataset", "synthetic", "--arch", "tiny_cnn", "--epochs", "1", "--no-progress"]
    code = main([*args, "--train-subset", "100", "--batch-size", "50", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} in {captured.out}"))
    assert report["val_acc"] is None and 0 <= report["test_acc"] <= 100


def test_train_without_progress_logs_the_ig_phase(tmp_path, capsys, caplog, tiny_teacher_checkpoint):
    args = [*TRAIN, "--dataset", "synthetic", "--val-size", "100", "--train-subset", "20", "--ig-steps", "2"]
    args += ["--teacher-checkpoint", tiny_teacher_checkpoint, "--cache-dir", tmp_path / "cache", "--no-progress"]
    with caplog.at_level("INFO", logger="kdsearch"):
        code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "computing IG maps: 20 of 20 training images to go (baseline black, n_steps 2," in caplog.text
    assert "IG maps:" not in captured.err and "step/s" not in captured.err  # no progress bars


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TRAIN,
        *NO_TEACHER,
        "--dataset",
        "synthetic",
        "--val-size",
        "100",
        "--train-subset",
        "40",
        "--epochs",
        "1000",
    ]
    args += ["--run-dir", run_dir, "--cache-dir", tmp_path / "cache", "--no-progress", "--precision", "fp32"]
    process = subprocess.Popen(
        [sys.executable, "-c", "from kdsearch.cli.main import entry; entry()", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "interrupted: the per-epoch checkpoints in --run-dir are kept; run the same command with --resume"
    )
    assert (run_dir / "last.pt").exists()


# --- wrong value types: one line at validation ------------------------------------------------------------

TOML_STUDY = """
name = "types"
[train]
{line}
data = {{dataset = "synthetic", synthetic_size = 400, val_size = 100}}
student = {{arch = "tiny_cnn", drop_blocks = 1}}
teacher = {{arch = "tiny_cnn"}}
[teacher.train]
epochs = 1
[grid]
t = [1.0]
alpha = [0.1]
p = [0.5]
"""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('epochs = "three"', "epochs must be an integer but got 'three' (TrainConfig)"),
        ('optim = {lr = "fast"}', "lr must be a number but got 'fast' (OptimConfig)"),
        ("batch_size = 32.5", "batch_size must be an integer but got 32.5 (TrainConfig)"),
        ("epochs = true", "epochs must be an integer but got True (TrainConfig)"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_one_line(tmp_path, capsys, line, message):
    study_file = tmp_path / "types.toml"
    study_file.write_text(TOML_STUDY.format(line=line))
    workdir = tmp_path / "work"
    workdir.mkdir()
    _fails_cleanly(capsys, ["study", "grid", "--study", study_file, "--workdir", workdir], message, workdir)


@pytest.mark.parametrize(
    ("command", "setting", "message"),
    [
        ("grid", "train.epochs=three", "epochs must be an integer but got 'three' (TrainConfig)"),
        ("ablate", "ablation.seeds=two", "seeds must be an integer but got 'two' (AblationSpec)"),
        ("grid", "teacher.train.epochs=three", "epochs must be an integer but got 'three' (TeacherRecipe)"),
        pytest.param(
            "grid",
            "latency.repeats=x",
            "repeats must be an integer",
        ),
        pytest.param(
            "grid",
            "latency.warmup=true",
            "warmup must be an integer",
        ),
        pytest.param(
            "tpe",
            "tpe.t={low: 1, high: 2, log: maybe}",
            "log must be true or false",
        ),
    ],
)
def test_a_set_value_of_the_wrong_type_is_one_line(tmp_path, capsys, monkeypatch, command, setting, message):
    import kdsearch.search.study

    # Where a wrong type is not caught, the command must not go on to train.
    monkeypatch.setattr(
        kdsearch.search.study, "run_study", lambda *args, **kwargs: pytest.fail(f"{setting} was accepted")
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = ["study", command] if command != "ablate" else ["ablate"]
    args += ["--study", SMOKE, "--workdir", workdir, "--set", setting]
    _fails_cleanly(capsys, args, message, workdir)


# --- issue 31: the long tail of bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workdir", "message"),
    [("afile/sub", "cannot be created: {tmp}/afile is a file, not a folder"), ("/proc/x", "/proc is not writable")],
)
def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch, workdir, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    args = ["study", "grid", "--study", SMOKE, "--workdir", workdir, "--cache-dir", tmp_path / "cache"]
    _fails_cleanly(capsys, args, message.format(tmp=tmp_path), tmp_path / "cache")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


def test_errors_found_once_the_workdir_is_known_leave_no_folder(tmp_path, capsys):
    new = tmp_path / "new"
    args = ["study", "grid", "--study", SMOKE, "--workdir", new / "work", "--set", "train.data.val_size=0"]
    _fails_cleanly(capsys, args, "studies select on validation accuracy: train.data.val_size must be > 0")
    (tmp_path / "stores").mkdir()
    args = ["study", "worker", "--study-name", "nope", "--workdir", new / "work"]
    _fails_cleanly(capsys, [*args, "--storage", f"sqlite:///{tmp_path}/stores/studies.db"], "no such file")
    assert not new.exists()


def _truncated(template: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(template.read_bytes()[: template.stat().st_size // 2])
    return target


@pytest.mark.parametrize("store", ["storage file", "studies.db", "mlflow.db"])
def test_a_store_that_is_not_a_database_is_one_line_and_nothing_is_written(tmp_path, capsys, _mlflow_template, store):
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = ["study", "grid", "--study", SMOKE, "--workdir", workdir, "--cache-dir", tmp_path / "cache"]
    if store == "storage file":
        broken = tmp_path / "some.pt"
        torch.save({"weight": torch.zeros(2)}, broken)
        args += ["--storage", f"sqlite:///{broken}"]
    else:
        broken = _truncated(_mlflow_template, workdir / ("mlruns" if store == "mlflow.db" else "") / store)
    before = broken.read_bytes()
    err = _fails_cleanly(capsys, args, f"{broken}: ", tmp_path / "cache")
    assert err.endswith("(not a sound SQLite database file)\n"), err
    assert broken.read_bytes() == before
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()) == [
        broken.relative_to(tmp_path)
    ]


def test_a_tracking_uri_of_no_known_kind_is_one_line(study, capsys, monkeypatch):
    study(["--tracking-uri", "foo://bar"], "tracking store foo://bar: not a tracking URI kdsearch can use")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # `ui` handles SIGTERM: not in pytest's process
    started = time.monotonic()
    _fails_cleanly(capsys, ["ui", "--tracking-uri", "foo://bar"], "not a tracking URI kdsearch can use")
    assert time.monotonic() - started < 5  # refused, not a server that fails to start


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--study-name", "a" * 300], "study name 'aaaaaaaaaaaaaaaaaaaaaaaa'... is 300 bytes long; at most 200"),
        (["--experiment", "e" * 300], "--experiment 'eeeeeeeeeeeeeeeeeeeeeeee'... is 300 bytes long; at most 200"),
        (["--set", "train.optim.lr=.inf"], "train.optim.lr must be a finite number but got inf"),
        (["--set", "grid.t=[1, -.inf]"], "grid.t must be a finite number but got -inf"),
    ],
)
def test_a_name_too_long_for_a_folder_or_an_infinite_value_is_one_line(study, flags, message):
    study(flags, message)


def test_a_teacher_checkpoint_that_is_a_folder_says_so(study, tmp_path, capsys):
    folder = tmp_path / "teacher.pt"
    folder.mkdir()
    study(["--teacher-checkpoint", folder], f"teacher checkpoint {folder} is a folder")
    args = [*TRAIN, "--dataset", "synthetic", "--val-size", "100", "--teacher-checkpoint", folder]
    _fails_cleanly(capsys, [*args, "--run-dir", tmp_path / "run"], "is a folder", tmp_path / "run")


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "gpu:0"])
def test_a_worker_on_a_misspelt_device_is_one_line_and_runs_nothing(tmp_path, capsys, device):
    from kdsearch.search.optuna_storage import HeartbeatConfig
    from kdsearch.search.study import open_study
    from kdsearch.search.studyfile import load_study
    from kdsearch.search.tune import GRID

    handle = open_study(GRID, load_study(SMOKE), f"sqlite:///{tmp_path}/studies.db", HeartbeatConfig(), "queued")
    args = ["study", "worker", "--study-name", "queued", "--workdir", tmp_path, "--device", device]
    _fails_cleanly(capsys, args, f"device must be auto, cpu or cuda[:N] but got '{device}'", tmp_path / "mlruns")
    assert {trial.state.name for trial in handle.trials()} == {"WAITING"}


def test_a_study_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    study_file = tmp_path / "latin1.yaml"
    study_file.write_bytes("name: latin1\ntrain: {epochs: 1}  # étude\n".encode("latin-1"))
    workdir = tmp_path / "work"
    args = ["study", "grid", "--study", study_file, "--workdir", workdir]
    _fails_cleanly(capsys, args, f"study file {study_file} is not UTF-8 text: byte 0xe9 on line 2", workdir)


def test_ablation_attention_pairs_that_do_not_exist_are_refused_before_any_arm_trains(tmp_path, capsys):
    workdir = tmp_path / "work"
    args = ["ablate", "--study", SMOKE, "--workdir", workdir, "--cache-dir", tmp_path / "cache"]
    args += ["--extra-arms", "at", "--gamma", "0.5", "--set", "train.attention.pairs=[[99, 99]]"]
    message = "attention pair (99, 99): the student has feature blocks 0-2, not 99"
    _fails_cleanly(capsys, args, message, workdir, tmp_path / "cache")


def test_ig_show_refuses_an_out_that_is_a_folder_before_computing_maps(tmp_path, capsys, tiny_teacher_checkpoint):
    out = tmp_path / "panel.png"
    out.mkdir()
    args = ["ig", "show", "--teacher-checkpoint", tiny_teacher_checkpoint, "--arch", "tiny_cnn"]
    args += ["--dataset", "synthetic", "--val-size", "100", "--index", "0", "--out", out]
    _fails_cleanly(capsys, [*args, "--cache-dir", tmp_path / "cache"], f"--out {out} is a folder", out)
    assert not (tmp_path / "cache").exists()


def test_train_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    run_dir, cache = tmp_path / "new-run", tmp_path / "cache"
    args = [*TRAIN, *NO_TEACHER, "--dataset", "synthetic", "--val-size", "100", "--run-dir", run_dir, "--resume"]
    message = f"--resume: nothing to resume in {run_dir} (no last.pt)"
    _fails_cleanly(capsys, [*args, "--cache-dir", cache], message, run_dir, cache)
    assert not run_dir.exists()


def test_a_bare_tiny_cnn_state_dict_is_told_its_arch_not_a_negative_drop(tmp_path, capsys):
    torch.save(build_model(ModelConfig(arch="tiny_cnn")).state_dict(), tmp_path / "bare.pt")
    args = ["eval", "--checkpoint", tmp_path / "bare.pt", "--dataset", "synthetic", "--cache-dir", tmp_path / "c"]
    err = _fails_cleanly(capsys, args, "; it looks like --arch tiny_cnn")
    assert "--drop-blocks" not in err.split("; it looks like")[1]


def test_a_checkpoint_that_is_a_folder_says_so(tmp_path, capsys):
    (tmp_path / "model.pt").mkdir()
    args = ["eval", "--checkpoint", tmp_path / "model.pt", "--dataset", "synthetic", "--cache-dir", tmp_path / "c"]
    _fails_cleanly(capsys, args, f"checkpoint {tmp_path / 'model.pt'} is a folder, not a checkpoint file")


def test_more_agreement_images_than_the_test_set_has_is_refused_before_the_study(tmp_path, capsys):
    args = ["ablate", "--study", SMOKE, "--workdir", tmp_path / "w", "--agreement-images", "100000"]
    _fails_cleanly(capsys, args, "agreement_images=100000 exceeds the 100 test images", tmp_path / "w")


ATTR = ["attr", "compute", "--arch", "tiny_cnn", "--dataset", "synthetic", "--val-size", "100"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lime"], "'--method': Value error, 'lime' is not one of 'integrated_gradients', 'saliency',"),
        (["--method", "smoothgrad", "--samples", "0"], "attribution samples must be >= 1 but got 0"),
        (["--method", "gradient_shap", "--sigma", "-0.1"], "attribution sigma must be >= 0 but got -0.1"),
        (
            ["--method", "grad_cam", "--layer", "features.9"],
            "grad_cam layer 'features.9' is not a module of the teacher",
        ),
    ],
)
def test_attr_refuses_a_method_or_setting_it_cannot_use_before_anything_is_written(
    tmp_path, capsys, tiny_teacher_checkpoint, extra, message
):
    cache = tmp_path / "cache"
    args = [*ATTR, "--teacher-checkpoint", tiny_teacher_checkpoint, "--cache-dir", cache, *extra]
    _fails_cleanly(capsys, args, message, cache)
    assert not cache.exists()


def test_a_study_with_an_unknown_overlay_method_is_one_line(study):
    study(["--set", "train.overlay.method=lime"], "overlay method must be one of ['integrated_gradients', 'saliency',")


def test_an_ablation_with_a_grad_cam_layer_the_teacher_lacks_is_refused_before_the_study(tmp_path, capsys):
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    args = ["ablate", "--study", SMOKE, "--workdir", workdir, "--cache-dir", cache, "--arms", "baseline,kd_grad_cam"]
    message = "grad_cam layer 'head' is not a module of the teacher"
    _fails_cleanly(capsys, [*args, "--set", "train.attribution.layer=head"], message, workdir, cache)
    _fails_cleanly(
        capsys, [*args, "--agreement-method", "lime"], "'--agreement-method': Value error, 'lime' is not one of"
    )
