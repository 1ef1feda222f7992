"""Cheap checks of a run's inputs before anything is written: files, data layout, teacher shape, device.

Called by every study kind's ``validate`` (through ``studyfile.check_files``) and by the single-run
commands, so that bad input fails with one line and exit code 2 before a study, cache or run exists.
Cheap means listings, image headers and state-dict shapes: no image is decoded and no model is run.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kdsearch.config import DataConfig, Dataset, ModelConfig, TrainConfig, check_device_name, is_built_in, replace
from kdsearch.errors import CheckpointError, ConfigError, DataError, NotWritable
from kdsearch.infra.storage import check_writable

if TYPE_CHECKING:
    from kdsearch.data.datasets import Layout

# torch, the data sources and the models are imported where used: reading a study file runs
# ``check_inputs``, and commands such as ``study status`` read study files without needing them.


def check_inputs(config: TrainConfig) -> None:
    """Raise a one-line KdsearchError for inputs ``config`` cannot run with.

    A teacher checkpoint that does not exist is not an error here: a study's teacher trained from its
    recipe is written there later. Callers given a file check that it exists (``studyfile.check_files``,
    the ``train`` command).
    """
    check_device(config.device)
    check_writable(config.cache_dir, "cache_dir (--cache-dir)")
    layout = check_data(config.data, config.cache_dir)
    size = student_image_size(config.data)
    check_student(replace(config.student, num_classes=layout.classes), size)
    if config.prune.active and not is_built_in(config.student.arch):
        check_prunable(replace(config.student, num_classes=layout.classes), size or 32)
    if size is not None and (config.attention.gamma > 0 or config.attention.pairs is not None):
        check_attention(config, layout.classes, size)
    if config.teacher_checkpoint is not None and Path(config.teacher_checkpoint).exists():
        check_teacher(config.teacher_checkpoint, replace(config.teacher, num_classes=layout.classes))
    if config.overlay.p > 0:
        check_attribution(config, [config.overlay.method], layout.classes)


def check_attribution(config: TrainConfig, methods: Sequence[str], classes: int | None = None) -> None:
    """The teacher can be explained by each of ``methods`` with ``config``'s attribution settings (a
    grad_cam layer it has, a DeepLift Captum computes right); ``classes``: the data's, found when not given."""
    from kdsearch.distill.attribution import METHODS, Attribution

    checked = [Attribution.of(config, method) for method in methods if METHODS[method].check is not None]
    if checked:
        classes = classes if classes is not None else check_data(config.data, config.cache_dir).classes
        check_explainable(replace(config.teacher, num_classes=classes), checked, student_image_size(config.data))


def check_explainable(teacher: ModelConfig, attributions: Sequence, image_size: int | None) -> None:
    """``teacher``'s architecture can be explained by each ``distill.attribution.Attribution`` (no weights
    needed: a grad_cam layer's name and output, DeepLift's modules are the architecture's)."""
    import torch

    from kdsearch.distill.attribution import METHODS, check_method
    from kdsearch.models.classifiers import build_model

    checked = [attribution for attribution in attributions if METHODS[attribution.method].check is not None]
    if not checked:
        return
    # As in check_student: shapes only on the meta device, where the builder allows it.
    with torch.device("meta" if is_built_in(teacher.arch) else "cpu"):
        model = build_model(teacher)
    for attribution in checked:
        check_method(model, attribution, image_size)


def student_image_size(data: DataConfig) -> int | None:
    """The image size a student's forward is checked at; None for a folder at its own size, which is
    known only once decoded (its students' forward is checked at set-up instead)."""
    return data.image_size or (None if data.dataset == Dataset.FOLDER else 32)


def check_device(name: str) -> None:
    """The device is spelled right and this machine has it."""
    import torch

    from kdsearch.infra.device import resolve_device

    check_device_name(name)
    device = resolve_device(name)  # raises for CUDA where there is none
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_data(config: DataConfig, cache_dir: str | Path) -> Layout:
    """The source's layout, checked: it can be read (or downloaded), and the validation split and the
    training subset fit in its training set."""
    from kdsearch.data.datasets import DATASETS

    layout = DATASETS[config.dataset]().inspect(config, Path(cache_dir))
    if layout.download is not None:
        check_download(config.dataset, *layout.download)
    name = config.data_dir if config.dataset == "folder" else config.dataset
    if config.val_size >= layout.train_images:
        raise DataError(
            f"val_size {config.val_size} (--val-size) must be smaller than the {layout.train_images} training "
            f"images of {name}"
        )
    left = layout.train_images - config.val_size
    if config.train_subset is not None and config.train_subset > left:
        raise DataError(
            f"train_subset {config.train_subset} (--train-subset) exceeds the {left} training images of {name} "
            f"left after the validation split of {config.val_size}"
        )
    if config.train_subset is not None and config.train_subset < layout.classes:
        raise DataError(
            f"train_subset {config.train_subset} (--train-subset) is smaller than the {layout.classes} classes "
            f"of {name}: a stratified subset needs at least one image per class"
        )
    return layout


def check_download(name: str, url: str, root: Path) -> None:
    """Fail now where the download that loading ``name`` would start cannot succeed.

    Why a HEAD request rather than the download itself: it answers in well under a second (at once
    without a network), while the archive (~170 MB) would be fetched before the rest of the inputs were
    checked, and written even when they are not right. A download that breaks half-way still fails later.
    """
    try:
        check_writable(root, f"{name} download folder")
    except NotWritable as error:
        raise DataError(f"{name} is not in {root} and cannot be downloaded: {error}") from None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            pass
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):  # any other answer (e.g. 405 for HEAD) means the server is there
            raise DataError(f"{name} is not in {root}, and {url} answers {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"{name} is not in {root} and cannot be downloaded from {url} ({reason}); "
            "put it there (--data-dir), or use a local copy with --dataset folder --data-dir DIR"
        ) from None


def check_student(config: ModelConfig, image_size: int | None = 32) -> None:
    """The student can be built (e.g. its drop_blocks leave at least one feature block) and maps
    ``image_size`` images (None: not checked) to one logit per class."""
    import torch

    from kdsearch.models.classifiers import build_model

    # Built-in models on the meta device: shapes only, no memory, no initialisation. Some sourced builders
    # compute on tensors while they build (RegNet's widths), which the meta device cannot.
    device = "meta" if is_built_in(config.arch) else "cpu"
    try:
        with torch.device(device):
            model = build_model(config)
            if image_size is not None:
                check_logits(model, config, image_size)
    except ConfigError as error:
        flag = " (--student-drop)" if "drop_blocks" in str(error) else ""
        raise ConfigError(f"student: {error}{flag}") from None


def check_prunable(config: ModelConfig, image_size: int) -> None:
    """Torch-Pruning handles the sourced model (one pruning at half the channels, on a CPU copy)."""
    from kdsearch.models.classifiers import build_model
    from kdsearch.models.pruning import prune_classifier

    try:
        prune_classifier(build_model(config), ratio=0.5, image_size=image_size)
    except ConfigError as error:
        raise ConfigError(f"student {config.arch}: {error}") from None


def check_logits(model, config: ModelConfig, image_size: int) -> None:
    """One forward of a blank batch gives (batch, num_classes) logits; ConfigError in one line otherwise."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, 3, image_size, image_size))
    except ConfigError:
        raise
    except Exception as error:  # any layer may refuse the input: say which model and size, in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{config.arch} fails on {image_size}x{image_size} images: {reason}") from None
    if tuple(logits.shape) != (2, config.num_classes):
        raise ConfigError(
            f"{config.arch} returns shape {tuple(logits.shape)} for 2 images, not (2, {config.num_classes}) logits"
        )


def check_attention(config: TrainConfig, classes: int, image_size: int) -> None:
    """Attention transfer's block pairs (given, or the default ones) exist in the student and the teacher
    and have equal spatial sizes. Checked whenever pairs are given, even at gamma 0: a study may switch AT
    on in some trials only (an ablation's AT arms), and they would fail after the others had trained."""
    import torch

    from kdsearch.distill.attention import check_pairs, default_pairs
    from kdsearch.models.classifiers import build_model

    student_config = replace(config.student, num_classes=classes)
    teacher_config = replace(config.teacher, num_classes=classes)
    # As in check_student: shapes only on the meta device, where the builders allow it.
    device = "meta" if is_built_in(student_config.arch) and is_built_in(teacher_config.arch) else "cpu"
    with torch.device(device):
        student, teacher = build_model(student_config), build_model(teacher_config)
    pairs = config.attention.pairs or default_pairs(student, teacher, image_size)
    check_pairs(student, teacher, pairs, image_size)


def check_teacher(path: str | Path, config: ModelConfig) -> None:
    """The checkpoint's state dict has the keys and shapes of ``config``'s model."""
    import torch

    from kdsearch.models.classifiers import adapt_state, build_model, check_fits, read_checkpoint

    state, _ = read_checkpoint(path)
    with torch.device("meta"):
        model = build_model(config)
    state = adapt_state(model, state)
    try:
        check_fits(model, state, path, config)
    except CheckpointError as error:
        raise CheckpointError(f"teacher {error}") from None
