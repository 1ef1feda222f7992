import json
from pathlib import Path

import pytest
import torch

from kdsearch.cli.main import main
from tests.fakes import SMOKE

TINY_ARGS = ["--dataset", "synthetic", "--val-size", "100", "--arch", "tiny_cnn"]


def _run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "1.5"], "alpha must be in [0, 1] but got 1.5"),
        (["--alpha", "-0.1"], "alpha must be in [0, 1]"),
        (["--p", "2"], "p must be in [0, 1] but got 2.0"),
        (["--t", "0"], "temperature must be > 0 but got 0.0"),
        (["--t", "-1"], "temperature must be > 0"),
        (["--alpha", "abc"], "Invalid value for '--alpha'"),
        (
            ["--dataset", "folder", "--data-dir", "/nonexistent/kdsearch"],
            "data folder /nonexistent/kdsearch does not exist",
        ),
        (["--teacher-checkpoint", "/nonexistent/t.pt"], "checkpoint /nonexistent/t.pt does not exist"),
        (["--overlay-mode", "sideways"], "overlay mode must be one of ['aligned', 'shuffled']"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, args, message):
    run_dir = tmp_path / "run"
    base = ["train", *TINY_ARGS, "--student-drop", "1", "--epochs", "1", "--run-dir", str(run_dir)]
    if "--dataset" in args:
        base += ["--alpha", "0", "--p", "0"]  # no teacher needed: the data is what fails
    code, _, err = _run(capsys, base + args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not run_dir.exists()


def test_wrong_teacher_checkpoint_is_one_line_exit_2(capsys, tmp_path):
    from kdsearch.config import ModelConfig
    from kdsearch.models.classifiers import build_model

    torch.save(build_model(ModelConfig(arch="tiny_cnn", num_classes=3)).state_dict(), tmp_path / "t.pt")
    code, _, err = _run(
        capsys,
        ["train", *TINY_ARGS, "--student-drop", "1", "--epochs", "1", "--teacher-checkpoint", str(tmp_path / "t.pt")],
    )
    assert code == 2 and "classifier.1.weight has shape (3, 32)" in err and err.count("\n") == 1


@pytest.mark.slow
def test_train_end_to_end_prints_metrics(capsys, tiny_teacher_checkpoint, tmp_path):
    args = [
        "train",
        *TINY_ARGS,
        "--student-drop",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--teacher-checkpoint",
        tiny_teacher_checkpoint,
    ]
    code, out, _ = _run(
        capsys, args + ["--t", "2.5", "--alpha", "0.3", "--p", "0.5", "--run-dir", str(tmp_path / "run")]
    )
    assert code == 0
    metrics = json.loads(out)
    assert metrics["images_per_s"] > 0 and metrics["epochs"] == 1
    assert metrics["checkpoint"] == str(tmp_path / "run" / "model.pt")
    # The printed accuracies are the saved student's on the synthetic validation and test splits, at the
    # precision "auto" resolves to here, as training evaluated them (channels_last, batches of 500).
    from kdsearch.config import DataConfig
    from kdsearch.data.datasets import load_splits
    from kdsearch.infra.device import resolve_precision
    from kdsearch.models.classifiers import load_model
    from kdsearch.models.inference import accuracy

    student, architecture = load_model(metrics["checkpoint"])
    assert (architecture.arch, architecture.drop_blocks) == ("tiny_cnn", 1)
    student = student.to(memory_format=torch.channels_last)
    splits = load_splits(DataConfig(dataset="synthetic", val_size=100))
    cpu = torch.device("cpu")
    dtype = resolve_precision("auto", cpu)
    assert metrics["val_acc"] == accuracy(student, splits.val_images, splits.val_labels, 500, cpu, dtype)
    assert metrics["test_acc"] == accuracy(student, splits.test_images, splits.test_labels, 500, cpu, dtype)


@pytest.mark.slow
def test_teacher_train_then_eval(capsys, tmp_path):
    out_path = tmp_path / "teacher.pt"
    code, out, _ = _run(
        capsys, ["teacher", "train", *TINY_ARGS, "--epochs", "1", "--batch-size", "32", "--out", str(out_path)]
    )
    assert code == 0 and out_path.exists()
    trained = json.loads(out)
    code, out, _ = _run(capsys, ["teacher", "eval", "--checkpoint", str(out_path), "--dataset", "synthetic"])
    evaluated = json.loads(out)
    assert code == 0 and evaluated["params"] > 0 and evaluated["flops"] > 0
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"], abs=1.0)  # fp32 eval vs training-precision eval


@pytest.mark.slow
def test_ig_show_writes_a_png(capsys, tiny_teacher_checkpoint, tmp_path):
    from torchvision.io import decode_png, read_file

    out_path = tmp_path / "ig.png"
    args = [
        "ig",
        "show",
        *TINY_ARGS,
        "--teacher-checkpoint",
        tiny_teacher_checkpoint,
        "--index",
        "5",
        "--out",
        str(out_path),
        "--ig-steps",
        "4",
    ]
    code, out, _ = _run(capsys, args)
    assert code == 0 and "training-split image 5 (image " in out and "of the dataset's training set), class" in out
    image = decode_png(read_file(str(out_path)))
    assert image.shape[0] == 3 and image.shape[2] > 2.9 * image.shape[1]


@pytest.mark.slow
def test_ig_show_rejects_an_out_of_range_index(capsys, tiny_teacher_checkpoint, tmp_path):
    args = [
        "ig",
        "show",
        *TINY_ARGS,
        "--teacher-checkpoint",
        tiny_teacher_checkpoint,
        "--index",
        "1100",
        "--out",
        str(tmp_path / "x.png"),
    ]
    code, _, err = _run(capsys, args)
    assert code == 2 and "--index must be in [0, 1099]" in err and not (tmp_path / "x.png").exists()


def _leaf_commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_command_explains_itself(capsys):
    import typer.main

    from kdsearch.cli.main import app

    commands = list(_leaf_commands(typer.main.get_command(app)))
    assert len(commands) >= 13
    for path, command in commands:
        code, out, _ = _run(capsys, [*path, "--help"])
        summary = (command.help or "").split("\n")[0].strip()
        assert code == 0 and f"Usage: kdsearch {' '.join(path)}" in " ".join(out.split()), path
        assert len(summary) > 20 and summary[:20] in " ".join(out.split()), path
        options = [param for param in command.params if param.name != "help"]
        assert all(param.help for param in options), (path, [p.name for p in options if not p.help])


@pytest.mark.slow
def test_ig_compute_prints_the_cache_and_its_resolved_settings(capsys, tiny_teacher_checkpoint, tmp_path):
    args = ["ig", "compute", *TINY_ARGS, "--teacher-checkpoint", tiny_teacher_checkpoint, "--ig-steps", "3"]
    args += ["--cache-dir", str(tmp_path)]
    code, out, _ = _run(capsys, [*args, "--ig-precision", "fp32", "--ig-method", "riemann_right"])
    assert code == 0
    report = json.loads(out)
    assert report["images"] == 1100 and Path(report["cache"]).is_dir()
    assert report["settings"] | {"n_steps": 3, "precision": "fp32", "method": "riemann_right"} == report["settings"]
    code, _, err = _run(capsys, [*args, "--ig-precision", "fp16"])
    assert code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_in_a_study_says_what_is_kept_and_how_to_resume(capsys, tmp_path, monkeypatch):
    import kdsearch.search.study

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdsearch.search.study, "run_study", interrupted)
    study = SMOKE
    code, _, err = _run(capsys, ["study", "grid", "--study", str(study), "--workdir", str(tmp_path)])
    assert code == 130
    assert (
        err == "interrupted: finished trials and per-epoch checkpoints are kept; run the same command again to resume\n"
    )


def test_eval_of_a_bare_state_dict_says_what_it_assumes(capsys, tiny_teacher_checkpoint, tmp_path):
    import torch

    from kdsearch.models.classifiers import load_model

    bare = tmp_path / "bare.pt"
    torch.save(load_model(tiny_teacher_checkpoint)[0].state_dict(), bare)
    args = [
        "eval",
        "--checkpoint",
        str(bare),
        "--arch",
        "tiny_cnn",
        "--dataset",
        "synthetic",
        "--cache-dir",
        str(tmp_path),
    ]
    code, out, err = _run(capsys, args)
    assert code == 0 and "assuming --arch tiny_cnn --drop-blocks 0 --normalization cifar10" in err
    stored = _run(capsys, ["teacher", "eval", "--checkpoint", tiny_teacher_checkpoint, *args[5:]])
    assert stored[0] == 0 and "warning" not in stored[2]  # a kdsearch checkpoint carries its architecture
    assert json.loads(stored[1])["test_acc"] == json.loads(out)["test_acc"]


def test_attr_show_draws_the_image_beside_each_methods_map(capsys, tiny_teacher_checkpoint, tmp_path):
    from PIL import Image

    out = tmp_path / "maps.png"
    args = ["attr", "show", *TINY_ARGS, "--teacher-checkpoint", tiny_teacher_checkpoint, "--index", "5"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path), "--ig-steps", "4"]
    methods = ["integrated_gradients", "saliency", "grad_cam"]
    code, text, _ = _run(capsys, [*args, *(f"--method={method}" for method in methods)])
    assert code == 0 and "training-split image 5 (image " in text
    assert "maps: integrated_gradients computed now (no cache" in text and ", grad_cam computed now" in text
    panel = Image.open(out)
    tiles = 1 + 2 * len(methods)  # the image, then each method's map and overlay: 32 pixels, 1 of padding, x8
    assert panel.width == (1 + 33 * tiles) * 8 and panel.height > (1 + 33) * 8  # a caption names the methods


@pytest.mark.slow
def test_attr_compute_prints_the_method_and_its_cost_and_show_reads_its_cache(
    capsys, tiny_teacher_checkpoint, tmp_path
):
    common = [*TINY_ARGS, "--teacher-checkpoint", tiny_teacher_checkpoint, "--cache-dir", str(tmp_path)]
    code, out, _ = _run(capsys, ["attr", "compute", *common, "--method", "saliency", "--ig-precision", "fp32"])
    report = json.loads(out)
    assert code == 0 and report["method"] == "saliency" and report["images"] == 1100
    assert report["cost"]["maps_per_s"] > 0 and "completeness_relative_error" not in report
    assert report["settings"] == {"precision": "fp32"}
    show = ["attr", "show", *common, "--method", "saliency", "--ig-precision", "fp32", "--index", "3"]
    code, out, _ = _run(capsys, [*show, "--out", str(tmp_path / "s.png")])
    assert code == 0 and f"saliency from the cache {Path(report['cache']).name}" in out
