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
from tests.fakes import SMOKE

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
    assert "computing IG maps: 20 of 20 training images to go (2 steps" in caplog.text
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
