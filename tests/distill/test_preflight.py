"""kdsearch.distill.preflight: the cheap checks of a run's inputs, called directly (the CLI's one-line
errors for the same inputs are in tests/cli/test_bad_input.py)."""

from __future__ import annotations

import http.server
import re
import threading

import pytest
import torch

from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig, replace
from kdsearch.data.datasets import Layout
from kdsearch.distill.preflight import (
    check_data,
    check_device,
    check_download,
    check_inputs,
    check_student,
    check_teacher,
)
from kdsearch.errors import CheckpointError, ConfigError, DataError, NotWritable
from kdsearch.models.classifiers import build_model, save_checkpoint
from tests.fakes import SYNTHETIC, TINY, TINY_STUDENT


def _data(**changes) -> DataConfig:
    return replace(SYNTHETIC, **changes)  # 400 training images before the split, 10 classes


# --- check_data ---------------------------------------------------------------------------------


def test_check_data_returns_the_layout_and_writes_nothing(tmp_path):
    assert check_data(SYNTHETIC, tmp_path / "cache") == Layout(classes=10, train_images=400, test_images=100)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"val_size": 400}, "val_size 400 (--val-size) must be smaller than the 400 training images of synthetic"),
        ({"val_size": 100, "train_subset": 301}, "train_subset 301 (--train-subset) exceeds the 300 training images of synthetic left after the validation split of 100"),
        ({"val_size": 0, "train_subset": 9}, "train_subset 9 (--train-subset) is smaller than the 10 classes of synthetic"),
    ],
)  # fmt: skip
def test_splits_the_data_cannot_give(tmp_path, changes, message):
    with pytest.raises(DataError, match=re.escape(message)):
        check_data(_data(**changes), tmp_path)


@pytest.mark.parametrize(
    "changes",
    [{"val_size": 399}, {"val_size": 100, "train_subset": 300}, {"val_size": 0, "train_subset": 10}],
)
def test_splits_at_the_limits_fit(tmp_path, changes):
    assert check_data(_data(**changes), tmp_path).train_images == 400


def test_a_folder_dataset_is_named_by_its_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "pets"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    assert check_data(DataConfig(dataset="folder", data_dir=str(root), val_size=1), tmp_path) == Layout(
        2, 2, test_images=2
    )
    with pytest.raises(DataError, match=re.escape(f"must be smaller than the 2 training images of {root}")):
        check_data(DataConfig(dataset="folder", data_dir=str(root), val_size=2), tmp_path)


# --- check_download -------------------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    codes = {"/there.tar.gz": 200, "/gone.tar.gz": 404, "/no-head.tar.gz": 405}

    def do_HEAD(self):
        self.send_response(self.codes.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["/there.tar.gz", "/no-head.tar.gz"])  # 405: the server is there
def test_a_download_that_can_start_passes(server, tmp_path, path):
    check_download("cifar10", server + path, tmp_path / "downloads")
    assert not (tmp_path / "downloads").exists()


def test_a_download_the_server_does_not_have(server, tmp_path):
    url = server + "/gone.tar.gz"
    message = f"cifar10 is not in {tmp_path}, and {url} answers 404 Not Found"
    with pytest.raises(DataError, match=re.escape(message)):
        check_download("cifar10", url, tmp_path)


def test_a_download_from_nowhere(tmp_path):
    url = "http://127.0.0.1:1/cifar-10-python.tar.gz"  # nothing listens on port 1
    with pytest.raises(DataError) as raised:
        check_download("cifar10", url, tmp_path)
    message = str(raised.value)
    assert message.startswith(f"cifar10 is not in {tmp_path} and cannot be downloaded from {url} (")
    assert message.endswith("); put it there (--data-dir), or use a local copy with --dataset folder --data-dir DIR")


def test_a_download_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("")
    root = tmp_path / "a-file" / "cifar"
    message = f"cifar100 is not in {root} and cannot be downloaded: cifar100 download folder {root} cannot be created"
    with pytest.raises(DataError, match=re.escape(message)):
        check_download("cifar100", "http://127.0.0.1:1/x", root)  # refused before any request


# --- check_student, check_teacher, check_device ---------------------------------------------------


def test_check_student():
    check_student(TINY_STUDENT)
    check_student(replace(TINY, drop_blocks=3))  # one block left
    message = "student: drop_blocks=4 would remove all 4 feature blocks of tiny_cnn (--student-drop)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_student(replace(TINY, drop_blocks=4))


def test_check_teacher(tiny_teacher_checkpoint):
    check_teacher(tiny_teacher_checkpoint, TINY)
    with pytest.raises(CheckpointError, match=r"^teacher checkpoint .* does not fit tiny_cnn \(drop_blocks=1"):
        check_teacher(tiny_teacher_checkpoint, TINY_STUDENT)
    with pytest.raises(CheckpointError, match=re.escape("(10, 32) in the checkpoint, (100, 32) in the model")):
        check_teacher(tiny_teacher_checkpoint, replace(TINY, num_classes=100))


def test_check_device():
    check_device("cpu")
    check_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=re.escape("device cuda was asked for but CUDA is not available")):
            check_device("cuda:1")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(
            ConfigError, match=re.escape(f"device cuda:{count}: this machine has {count} CUDA device(s)")
        ):
            check_device(f"cuda:{count}")


# --- check_inputs ---------------------------------------------------------------------------------


def _config(tmp_path, **changes) -> TrainConfig:
    values = {"data": SYNTHETIC, "student": TINY_STUDENT, "teacher": TINY, "cache_dir": str(tmp_path / "cache")}
    values |= {"kd": KDConfig(alpha=0.5), "overlay": OverlayConfig(p=0.0), "teacher_checkpoint": "later.pt"}
    return TrainConfig(**{**values, **changes})


def test_a_teacher_file_not_written_yet_is_not_an_error(tmp_path):
    check_inputs(_config(tmp_path, teacher_checkpoint=str(tmp_path / "trained-later.pt")))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the cache folder


def test_check_inputs_checks_the_teacher_with_the_datas_class_count(tmp_path):
    three = build_model(ModelConfig(arch="tiny_cnn", num_classes=3))
    save_checkpoint(three, ModelConfig(arch="tiny_cnn", num_classes=3), tmp_path / "three.pt")
    with pytest.raises(CheckpointError, match=re.escape("(3, 32) in the checkpoint, (10, 32) in the model")):
        check_inputs(_config(tmp_path, teacher_checkpoint=str(tmp_path / "three.pt")))


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"student": replace(TINY, drop_blocks=9)}, ConfigError, "student: drop_blocks=9 would remove all 4"),
        ({"data": _data(val_size=400)}, DataError, "val_size 400 (--val-size) must be smaller"),
    ],
)
def test_check_inputs_checks_student_and_data(tmp_path, changes, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_inputs(_config(tmp_path, **changes))


def test_check_inputs_refuses_a_cache_dir_under_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    message = f"cache_dir (--cache-dir) {tmp_path}/f/c cannot be created: {tmp_path}/f is a file, not a folder"
    with pytest.raises(NotWritable, match=re.escape(message)):
        check_inputs(_config(tmp_path, cache_dir=str(tmp_path / "f" / "c")))
