"""kdsearch.config: validation of every config dataclass, to_dict/from_dict, flatten, replace, and the
fields added later that ``to_dict`` leaves out at their default (so old cache keys still match)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from kdsearch.config import (
    ADDED_LATER,
    Architecture,
    AttentionConfig,
    AttributionConfig,
    DataConfig,
    Dataset,
    IGConfig,
    KDConfig,
    ModelConfig,
    Normalization,
    OptimConfig,
    OverlayConfig,
    PruneConfig,
    TeacherRecipe,
    TrainConfig,
    default_cache_dir,
    default_data_dir,
    flatten,
    from_dict,
    replace,
    to_dict,
)
from kdsearch.errors import ConfigError
from tests.fakes import SYNTHETIC, TINY, TINY_STUDENT

NO_TEACHER = {"kd": KDConfig(alpha=0.0), "overlay": OverlayConfig(p=0.0)}


def _train(**changes) -> TrainConfig:
    """A TrainConfig that needs no teacher, with ``changes``."""
    return TrainConfig(**{"data": SYNTHETIC, "student": TINY_STUDENT, "teacher": TINY, **NO_TEACHER, **changes})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DataConfig(dataset="imagenet"), "dataset must be one of ['cifar10', 'cifar100', 'folder', 'synthetic'] but got 'imagenet'"),
        (lambda: DataConfig(dataset="folder"), "dataset 'folder' needs --data-dir (a folder with train/ and test/)"),
        (lambda: DataConfig(val_size=-1), "val_size must be >= 0 but got -1"),
        (lambda: DataConfig(train_subset=0), "train_subset must be positive but got 0"),
        (lambda: DataConfig(synthetic_size=39), "synthetic_size must be >= 40 but got 39"),
        (lambda: ModelConfig(num_classes=1), "num_classes must be >= 2 but got 1"),
        (lambda: ModelConfig(drop_blocks=-1), "drop_blocks must be >= 0 but got -1"),
        (lambda: ModelConfig(width_mult=0.0), "width_mult must be > 0 but got 0.0"),
        (lambda: ModelConfig(dropout=1.5), "dropout must be in [0, 1] but got 1.5"),
        (lambda: KDConfig(alpha=-0.5), "alpha must be in [0, 1] but got -0.5"),
        (lambda: KDConfig(temperature=float("inf")), "temperature must be > 0 but got inf"),
        (lambda: KDConfig(temperature=float("nan")), "temperature must be > 0 but got nan"),
        (lambda: KDConfig(teacher_logits="offline"), "teacher_logits must be one of ['online', 'cached'] but got 'offline'"),
        (lambda: IGConfig(baseline="white"), "IG baseline must be one of ['black', 'mean', 'zeros_normalized'] but got 'white'"),
        (lambda: IGConfig(n_steps=1), "IG n_steps must be >= 2 but got 1"),
        (lambda: IGConfig(internal_batch_size=0), "internal_batch_size must be >= 1 but got 0"),
        (lambda: IGConfig(images_per_call=0), "images_per_call must be >= 1 but got 0"),
        (lambda: IGConfig(precision="fp16"), "IG precision must be one of ['auto', 'fp32', 'bf16'] but got 'fp16'"),
        (lambda: OverlayConfig(p=1.01), "p must be in [0, 1] but got 1.01"),
        (lambda: OverlayConfig(method="lime"), "overlay method must be one of ['integrated_gradients', 'saliency', 'input_x_gradient', 'smoothgrad', 'gradient_shap', 'deeplift', 'grad_cam'] but got 'lime'"),
        (lambda: AttributionConfig(samples=0), "attribution samples must be >= 1 but got 0"),
        (lambda: AttributionConfig(sigma=-0.1), "attribution sigma must be >= 0 but got -0.1"),
        (lambda: AttributionConfig(sigma=float("inf")), "attribution sigma must be >= 0 but got inf"),
        (lambda: AttributionConfig(layer=" "), "attribution layer must be a module name or null"),
        (lambda: OptimConfig(optimizer="rmsprop"), "optimizer must be one of ['adam', 'sgd'] but got 'rmsprop'"),
        (lambda: OptimConfig(lr=0.0), "lr must be > 0 but got 0.0"),
        (lambda: OptimConfig(weight_decay=-1e-4), "weight_decay must be >= 0 but got -0.0001"),
        (lambda: OptimConfig(schedule="cosine"), "schedule must be one of ['constant', 'warmup_linear'] but got 'cosine'"),
        (lambda: OptimConfig(warmup_fraction=2.0), "warmup_fraction must be in [0, 1] but got 2.0"),
        (lambda: OptimConfig(label_smoothing=1.0), "label_smoothing must be in [0, 1) but got 1.0"),
        (lambda: PruneConfig(ratio=0.5, flops_target=0.5), "prune needs one of ratio, flops_target or stage_ratios, not several (got ratio, flops_target)"),
        (lambda: PruneConfig(stage_ratios=(0.0, 1.0)), "prune stage_ratios must be ratios in [0, 1), at least one above 0, but got (0.0, 1.0)"),
        (lambda: PruneConfig(flops_target=1.0), "prune flops_target must be in (0, 1) but got 1.0"),
        (lambda: PruneConfig(ratio=0.5, importance="hessian"), "prune importance must be one of ['l1', 'l2', 'random', 'taylor'] but got 'hessian'"),
        (lambda: AttentionConfig(gamma=-1.0), "attention gamma must be >= 0 but got -1.0"),
        (lambda: AttentionConfig(p=0.0), "attention p must be > 0 but got 0.0"),
        (lambda: AttentionConfig(pairs=()), "attention pairs: give [[student block, teacher block], ...] or null"),
        (lambda: _train(epochs=0), "epochs must be >= 1 but got 0"),
        (lambda: _train(batch_size=0), "batch_size must be >= 1 but got 0"),
        (lambda: _train(eval_batch_size=0), "eval_batch_size must be >= 1 but got 0"),
        (lambda: _train(crop_padding=-1), "crop_padding must be >= 0 but got -1"),
        (lambda: _train(pad_mode="edge"), "pad_mode must be one of ['constant', 'reflect'] but got 'edge'"),
        (lambda: _train(student_init="imagenet"), "student_init must be one of ['random', 'teacher'] but got 'imagenet'"),
        (lambda: _train(precision="int8"), "precision must be one of ['auto', 'fp32', 'bf16', 'fp16'] but got 'int8'"),
        (lambda: _train(device="tpu"), "device must be auto, cpu or cuda[:N] but got 'tpu'"),
        (lambda: TeacherRecipe(epochs=0), "teacher.train.epochs must be >= 1 but got 0"),
        (lambda: TeacherRecipe(batch_size=0), "teacher.train.batch_size must be >= 1 but got 0"),
        (lambda: TeacherRecipe(lr=0.0), "teacher.train.lr must be > 0 but got 0.0"),
    ],
)  # fmt: skip
def test_an_out_of_range_value_is_refused_with_its_name_and_value(build, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: KDConfig(alpha=True), "alpha must be a number but got True (KDConfig)"),
        (lambda: KDConfig(temperature="2"), "temperature must be a number but got '2' (KDConfig)"),
        (lambda: DataConfig(train_subset="5"), "train_subset must be an integer or null but got '5' (DataConfig)"),
        (lambda: DataConfig(label=3), "label must be a string or null but got 3 (DataConfig)"),
        (lambda: ModelConfig(num_classes=10.0), "num_classes must be an integer but got 10.0 (ModelConfig)"),
        (lambda: ModelConfig(channels=(8, True)), "channels must be a list of an integer or null but got (8, True)"),
        (lambda: ModelConfig(channels=8), "channels must be a list of an integer or null but got 8"),
        (lambda: AttentionConfig(pairs=[[1, 2, 3]]), "pairs must be a list of a list of an integer or null"),
        (lambda: _train(channels_last="yes"), "channels_last must be true or false but got 'yes' (TrainConfig)"),
        (lambda: _train(teacher_checkpoint=1), "teacher_checkpoint must be a string or null but got 1 (TrainConfig)"),
        (lambda: TrainConfig(data={"dataset": "synthetic"}), "data must be DataConfig but got {'dataset': 'synthetic'}"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_refused(build, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        # The built-in names first; the list may go on (model sources), the value refused is named.
        (lambda: ModelConfig(arch="resnet18"), r"^arch must be one of \['mobilenetv2_cifar', 'tiny_cnn'(, '[^']+')*\] but got 'resnet18'$"),
        (lambda: ModelConfig(normalization="bgr"), r"^normalization must be one of \['cifar10', 'cifar100', ('[^']+', )*'none'\] but got 'bgr'$"),
    ],
)  # fmt: skip
def test_an_unknown_name_is_refused_with_the_known_ones(build, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build()


def test_integers_are_numbers_but_bools_are_not_integers():
    kd = KDConfig(alpha=1, temperature=3)  # a study file's `alpha = 1`
    assert (kd.alpha, kd.temperature) == (1, 3)
    with pytest.raises(ConfigError, match=re.escape("epochs must be an integer but got False (TeacherRecipe)")):
        TeacherRecipe(epochs=False)


def test_choices_are_stored_as_plain_strings():
    model = ModelConfig(arch="tiny_cnn", normalization=Normalization.NONE)
    data = DataConfig(dataset=Dataset.SYNTHETIC)
    assert type(model.normalization) is str and model.normalization == "none"
    assert type(data.dataset) is str and json.dumps(to_dict(data)["dataset"]) == '"synthetic"'


def test_an_architecture_given_as_its_enum_is_stored_as_a_plain_string(tmp_path):
    from kdsearch.models.classifiers import build_model, load_model, save_checkpoint

    model = ModelConfig(arch=Architecture.TINY_CNN)
    assert type(model.arch) is str and model.arch == "tiny_cnn"
    save_checkpoint(build_model(model), model, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt")[1] == model


def test_attention_pairs_become_tuples():
    assert AttentionConfig(pairs=[[1, 2], [3, 5]]).pairs == ((1, 2), (3, 5))
    assert AttentionConfig(pairs=None).pairs is None


@pytest.mark.parametrize(
    ("changes", "needs"),
    [
        ({}, False),
        ({"kd": KDConfig(alpha=0.1)}, True),
        ({"overlay": OverlayConfig(p=0.1)}, True),
        ({"attention": AttentionConfig(gamma=0.5)}, True),
        ({"prune": PruneConfig(flops_target=0.5)}, True),
        ({"student_init": "teacher"}, True),
        ({"prune": PruneConfig(importance="l1")}, False),  # no target: not pruning
    ],
)
def test_each_use_of_the_teacher_needs_a_checkpoint(changes, needs):
    with_checkpoint = _train(teacher_checkpoint="teacher.pt", **changes)
    assert with_checkpoint.needs_teacher is needs
    if needs:
        with pytest.raises(ConfigError, match=re.escape("a teacher checkpoint is needed when alpha > 0")):
            _train(**changes)
    else:
        assert _train(**changes).teacher_checkpoint is None


def test_prune_is_active_with_either_target():
    assert not PruneConfig().active
    assert PruneConfig(ratio=0.3).active and PruneConfig(flops_target=0.3).active


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_accepted_by_the_config(device):
    assert _train(device=device).device == device  # whether the machine has it is checked later (preflight)


def test_defaults_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    assert default_data_dir() == DataConfig().data_dir == str(tmp_path / "data")
    assert default_cache_dir() == tmp_path / "cache" and _train().cache_dir == str(tmp_path / "cache")
    monkeypatch.setenv("KDSEARCH_DATA_DIR", "")  # set but empty: not given
    monkeypatch.delenv("KDSEARCH_CACHE_DIR")
    assert default_data_dir() is None and DataConfig().data_dir is None
    assert default_cache_dir() == Path.home() / ".cache" / "kdsearch"


def test_the_default_student_is_the_papers():
    config = TrainConfig(data=SYNTHETIC, **NO_TEACHER)
    assert config.student == ModelConfig(arch="mobilenetv2_cifar", drop_blocks=5)
    assert config.teacher == ModelConfig() and config.teacher.drop_blocks == 0


# --- to_dict, from_dict, flatten, replace ---------------------------------------------------------

TRAIN_KEYS = {
    "data", "student", "teacher", "teacher_checkpoint", "student_init", "kd", "ig", "overlay", "optim",
    "epochs", "batch_size", "eval_batch_size", "seed", "crop_padding", "pad_mode", "device", "precision",
    "channels_last", "cache_dir",
}  # fmt: skip


def test_to_dict_leaves_out_options_added_later_while_they_hold_their_default():
    config = _train(cache_dir="/c")
    values = to_dict(config)
    assert set(values) == TRAIN_KEYS  # no "attention", no "prune": keys made before they existed still match
    assert values["student"] == {
        "arch": "tiny_cnn",
        "num_classes": 10,
        "drop_blocks": 1,
        "width_mult": 1.0,
        "normalization": "cifar10",
        "dropout": 0.2,
    }  # no "channels"
    assert values["kd"] == {"alpha": 0.0, "temperature": 2.5, "teacher_logits": "online"}
    assert values["cache_dir"] == "/c" and values["epochs"] == 100


def test_to_dict_keeps_an_option_added_later_once_it_is_used():
    pruned = _train(
        teacher_checkpoint="t.pt",
        prune=PruneConfig(ratio=0.5),
        student=ModelConfig(arch="tiny_cnn", channels=(4, 8, 12, 16)),
    )
    values = to_dict(pruned)
    assert set(values) == TRAIN_KEYS | {"prune"}
    assert values["prune"] == {"ratio": 0.5, "flops_target": None, "importance": "l2"}
    assert values["student"]["channels"] == (4, 8, 12, 16)
    assert "channels" not in values["teacher"]  # the same field, at its default, in a sibling
    at = to_dict(_train(attention=AttentionConfig(pairs=[[0, 1]])))  # gamma 0 but pairs set: not the default
    assert at["attention"] == {"gamma": 0.0, "p": 2.0, "pairs": ((0, 1),)}


CONFIGS = (
    DataConfig,
    ModelConfig,
    KDConfig,
    IGConfig,
    OverlayConfig,
    OptimConfig,
    AttentionConfig,
    PruneConfig,
    AttributionConfig,
)


def test_every_field_added_later_is_left_out_at_its_default_and_no_other():
    marked = {
        (cls.__name__, item.name)
        for cls in (*CONFIGS, TrainConfig)
        for item in dataclasses.fields(cls)
        if item.metadata == ADDED_LATER
    }
    assert {("ModelConfig", "channels"), ("TrainConfig", "attention"), ("TrainConfig", "prune")} <= marked
    assert {("OverlayConfig", "method"), ("TrainConfig", "attribution")} <= marked  # the other attribution methods
    config = _train(cache_dir="/c")
    values = to_dict(config)
    sections = {"TrainConfig": values} | {
        type(getattr(config, name)).__name__: values.get(name)
        for name in ("data", "student", "kd", "ig", "overlay", "optim")
    }
    for cls, section in sections.items():
        fields = {item.name for item in dataclasses.fields(_CLASSES[cls])}
        assert set(section) == {name for name in fields if (cls, name) not in marked}, cls


_CLASSES = {cls.__name__: cls for cls in (*CONFIGS, TrainConfig)}


def test_from_dict_round_trips_through_json():
    config = _train(
        teacher_checkpoint="t.pt",
        kd=KDConfig(alpha=0.3, temperature=4.0, teacher_logits="cached"),
        overlay=OverlayConfig(p=0.2, mode="shuffled"),
        optim=OptimConfig(optimizer="sgd", lr=0.05, schedule="warmup_linear"),
        attention=AttentionConfig(gamma=0.0, pairs=[[1, 2]]),
        data=DataConfig(dataset="synthetic", synthetic_size=400, val_size=100, train_subset=50, label="s"),
        cache_dir="/cache",
    )
    stored = json.loads(json.dumps(to_dict(config)))
    again = from_dict(TrainConfig, stored)
    assert again == config
    assert isinstance(again.kd, KDConfig) and again.attention.pairs == ((1, 2),)
    assert from_dict(TrainConfig, to_dict(_train(cache_dir="/c"))) == _train(cache_dir="/c")  # the omitted keys


def test_from_dict_takes_nested_configs_as_they_are():
    assert from_dict(TrainConfig, {"data": SYNTHETIC, **NO_TEACHER, "epochs": 2}).data is SYNTHETIC


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (KDConfig, {"alpha": 0.1, "beta": 1}, "unknown KDConfig key(s) ['beta']; known: ['alpha', 'teacher_logits', 'temperature']"),
        (TrainConfig, {"epoch": 3, "lrate": 1}, "unknown TrainConfig key(s) ['epoch', 'lrate']; known: ['attention', "),
        (TrainConfig, {"kd": {"temp": 2.0}}, "unknown KDConfig key(s) ['temp']"),
        (TrainConfig, {"student": {"arch": "tiny_cnn", "depth": 3}}, "unknown ModelConfig key(s) ['depth']"),
    ],
)  # fmt: skip
def test_from_dict_refuses_unknown_keys_by_name(cls, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(cls, values)


def test_from_dict_validates():
    with pytest.raises(ConfigError, match=re.escape("alpha must be in [0, 1] but got 3")):
        from_dict(TrainConfig, {"kd": {"alpha": 3}})


def test_flatten_has_every_field_also_those_to_dict_leaves_out():
    flat = flatten(_train(cache_dir="/c"))
    assert flat["kd.alpha"] == 0.0 and flat["data.synthetic_size"] == 400 and flat["epochs"] == 100
    assert flat["student.channels"] is None and flat["prune.ratio"] is None and flat["attention.gamma"] == 0.0
    assert not any(isinstance(value, dict) for value in flat.values())
    assert set(flat) == set(_leaves(TrainConfig))  # one key per field, nested ones dotted


def _leaves(cls, prefix: str = "") -> list[str]:
    """Every field of a config dataclass, by its declaration: "kd.alpha", …"""
    keys = []
    for item in dataclasses.fields(cls):
        nested = _CLASSES.get(item.type) if isinstance(item.type, str) else None
        keys += _leaves(nested, f"{prefix}{item.name}.") if nested else [f"{prefix}{item.name}"]
    return keys
    assert flatten(KDConfig(), prefix="kd.") == {"kd.alpha": 0.01, "kd.temperature": 2.5, "kd.teacher_logits": "online"}


def test_replace_builds_a_new_validated_config():
    base = KDConfig(alpha=0.2)
    changed = replace(base, temperature=5.0)
    assert changed == KDConfig(alpha=0.2, temperature=5.0) and base.temperature == 2.5
    with pytest.raises(ConfigError, match=re.escape("temperature must be > 0 but got -1.0")):
        replace(base, temperature=-1.0)
    with pytest.raises(ConfigError, match="a teacher checkpoint is needed"):
        replace(_train(), kd=KDConfig(alpha=0.5))  # the cross-field checks run again too


def test_a_pruned_architecture_survives_a_json_round_trip():
    pruned = ModelConfig(arch="tiny_cnn", channels=(4, 8, 12, 16))
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(pruned))))
    assert again == pruned and hash(again) == hash(pruned)
