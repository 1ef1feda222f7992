"""Attention transfer in training, the study file, the ablation and the grid: the AT arms of issue 13."""

from __future__ import annotations

import pytest
import torch

from kdsearch.cli.main import main
from kdsearch.config import AttentionConfig, KDConfig, TrainConfig, flatten, replace, to_dict
from kdsearch.distill.train import train
from kdsearch.errors import ConfigError
from kdsearch.search.ablation import arm_config
from kdsearch.search.studyfile import load_study
from kdsearch.search.tune import GRID
from tests.fakes import SMOKE


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


@pytest.mark.slow
def test_gamma_zero_trains_bit_for_bit_like_kd_ig(student_config):
    plain = train(student_config, progress=False)
    # gamma 0 with other AT settings: AT is off, so neither p nor the pairs may change anything.
    off = train(replace(student_config, attention=AttentionConfig(gamma=0.0, p=3.0, pairs=((0, 0),))), progress=False)
    on = train(replace(student_config, attention=AttentionConfig(gamma=1.0)), progress=False)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, off.model.state_dict()[name]), name
    assert plain.history == off.history and on.history[0]["train_loss"] != plain.history[0]["train_loss"]


def test_gamma_zero_keeps_the_configs_keys():
    base = TrainConfig(teacher_checkpoint="teacher.pt")
    assert "attention" not in to_dict(base) and "attention.gamma" in flatten(base)  # MLflow still shows it
    assert to_dict(replace(base, attention=AttentionConfig(gamma=0.5)))["attention"]["gamma"] == 0.5


@pytest.mark.slow
def test_training_with_at_removes_every_hook_and_keeps_no_features(student_config, monkeypatch):
    import kdsearch.distill.train as train_module

    teachers = []
    real_fold = train_module.fold_batchnorm
    monkeypatch.setattr(train_module, "fold_batchnorm", lambda model: teachers.append(real_fold(model)) or teachers[-1])
    result = train(replace(student_config, epochs=2, attention=AttentionConfig(gamma=1.0)), progress=False)
    assert len(teachers) == 1 and _hooks(teachers[0]) == 0 and _hooks(result.model) == 0


@pytest.mark.slow
def test_at_loss_enters_the_training_loss(student_config, monkeypatch):
    import kdsearch.distill.train as train_module

    values = []
    real = train_module.at_loss
    monkeypatch.setattr(train_module, "at_loss", lambda s, t, p: values.append(real(s, t, p)) or values[-1])
    train(replace(student_config, attention=AttentionConfig(gamma=1.0)), progress=False)
    assert len(values) > 1 and all(0 < value.item() <= 2**0.5 for value in values)


def test_at_with_cached_teacher_logits_is_refused(student_config):
    with pytest.raises(ConfigError, match="needs the online teacher's feature maps"):
        replace(
            student_config,
            kd=KDConfig(alpha=0.5, teacher_logits="cached"),
            attention=AttentionConfig(gamma=1.0),
        )


@pytest.mark.slow
def test_pairs_of_different_spatial_sizes_are_refused_before_training(student_config):
    with pytest.raises(ConfigError, match="need the same spatial size"):
        train(replace(student_config, attention=AttentionConfig(gamma=1.0, pairs=((0, 2),))), progress=False)


@pytest.mark.parametrize(
    ("arm", "alpha", "p", "gamma"),
    [
        ("baseline", 0.0, 0.0, 0.0),
        ("kd_ig", 0.5, 0.5, 0.0),
        ("at", 0.0, 0.0, 0.25),
        ("ig_at", 0.0, 0.5, 0.25),
        ("kd_at", 0.5, 0.0, 0.25),
        ("kd_ig_at", 0.5, 0.5, 0.25),
    ],
)
def test_the_arms_switch_exactly_their_terms(arm, alpha, p, gamma):
    spec = load_study(SMOKE, {"ablation.extra_arms": ["at", "ig_at", "kd_at", "kd_ig_at"], "ablation.gamma": 0.25})
    config = arm_config(spec, arm, 3)
    assert (config.kd.alpha, config.overlay.p, config.attention.gamma, config.seed) == (alpha, p, gamma, 3)


def test_at_arms_need_a_gamma():
    with pytest.raises(ConfigError, match=r"ablation arms \['kd_at'\] need the attention-transfer weight"):
        load_study(SMOKE, {"ablation.extra_arms": ["kd_at"]})


def test_a_gamma_grid_axis_multiplies_the_points():
    spec = load_study(SMOKE, {"grid.gamma": [0.0, 1.0]})
    points = GRID.points(GRID.space(spec))
    assert len(points) == 8 and {point["gamma"] for point in points} == {0.0, 1.0}
    assert "gamma" not in GRID.space(load_study(SMOKE))  # grids without AT keep their points


@pytest.mark.slow
def test_smoke_ablation_with_the_at_arms(tmp_path, shared_cache, capsys):
    args = ["ablate", "--study", str(SMOKE), "--workdir", str(tmp_path), "--seeds", "2", "--no-progress"]
    args += ["--arms", "baseline,kd_ig", "--extra-arms", "at,kd_ig_at", "--agreement-images", "0"]
    args += ["--set", "latency.repeats=1"]
    assert main([*args, "--gamma", "0.5"]) == 0
    out = capsys.readouterr().out
    for arm in ("baseline", "kd_ig", "at", "kd_ig_at"):
        assert f"\n{arm:<13}  2 " in out
    assert "kd_ig_at vs kd_ig" in out and "at vs baseline" in out
    # The same ablation with another gamma would mix two experiments: refused, nothing run.
    assert main([*args, "--gamma", "0.7"]) == 2
    assert "ran with ablation gamma 0.5" in capsys.readouterr().err
