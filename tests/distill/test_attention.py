import math
import weakref

import pytest
import torch

from kdsearch.config import ModelConfig
from kdsearch.distill.attention import FeatureTaps, at_loss, attention_map, check_pairs, default_pairs
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model

# Blocks of the CIFAR MobileNetV2 features and their output size at 32x32 input: 0 stem (32, stride 1),
# 1 (16 ch), 2-3 (24 ch, stride 1) at 32x32; 4-6 (32 ch, stride 2) at 16x16; 7-10 (64 ch, stride 2) and
# 11-13 (96 ch) at 8x8; 14-16 (160 ch, stride 2), 17 (320 ch) and 18 (1x1 conv to 1280) at 4x4.
# The paper's student drops the last 5 blocks (14-18), so it keeps 0-13 and ends at 8x8.
PAPER_STUDENT_PAIRS = [(3, 3), (6, 6), (13, 13)]


def _pixels(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def _normalised(model, images: torch.Tensor) -> torch.Tensor:
    return (images - model.input_mean) / model.input_std


def test_attention_map_matches_a_hand_computation():
    # Channel mean of the squares: [(1+1)/2, (4+0)/2, (0+4)/2, 0] = [1, 2, 2, 0], L2 norm 3.
    features = torch.stack([_pixels([1.0, -2.0], [0.0, 0.0]), _pixels([-1.0, 0.0], [2.0, 0.0])]).unsqueeze(0)
    expected = torch.tensor([[1 / 3, 2 / 3, 2 / 3, 0.0]])
    assert torch.allclose(attention_map(features), expected)


def test_attention_map_takes_absolute_values_for_odd_powers():
    # Channel mean of |A|: [1, 1, 1, 0], L2 norm sqrt(3).
    features = torch.stack([_pixels([-1.0, 2.0], [0.0, 0.0]), _pixels([1.0, 0.0], [2.0, 0.0])]).unsqueeze(0)
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0]]) / math.sqrt(3)
    assert torch.allclose(attention_map(features, p=1.0), expected)


def test_attention_map_is_float32_under_bf16_autocast():
    features = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = attention_map(features)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps.norm(dim=1), torch.ones(2))


def test_at_loss_matches_a_hand_computation():
    # B=2, C=2, H=W=2. Sample 0: Q_s = [1, 0, 0, 0], Q_t = [0, 1, 0, 0], distance sqrt(2).
    # Sample 1: Q_s = [1, 1, 1, 1] / 2, Q_t = [1, 0, 0, 0], distance ||[-1, 1, 1, 1] / 2|| = 1.
    corner, ones = _pixels([1.0, 0.0], [0.0, 0.0]), torch.ones(2, 2)
    student = torch.stack([torch.stack([corner, corner]), torch.stack([ones, -ones])])
    teacher = torch.stack(
        [
            torch.stack([_pixels([0.0, 1.0], [0.0, 0.0]), _pixels([0.0, 3.0], [0.0, 0.0])]),
            torch.stack([_pixels([2.0, 0.0], [0.0, 0.0]), torch.zeros(2, 2)]),
        ]
    )
    assert at_loss([student], [teacher]).item() == pytest.approx((math.sqrt(2) + 1) / 2, rel=1e-6)


def test_at_loss_is_the_mean_over_pairs():
    pairs = [(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)), (torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))]
    singles = [at_loss(student, teacher).item() for student, teacher in pairs]
    both = at_loss([student for student, _ in pairs], [teacher for _, teacher in pairs])
    assert both.item() == pytest.approx(sum(singles) / 2, rel=1e-6)


def test_identical_features_give_zero_loss_and_zero_gradient():
    features = torch.randn(3, 4, 5, 5, requires_grad=True)
    loss = at_loss(features, features.detach().clone())
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(features.grad).all()


def test_channel_counts_may_differ():
    loss = at_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 32, 4, 4))
    assert loss.ndim == 0 and 0 < loss.item() <= math.sqrt(2)


def test_spatial_mismatch_names_the_pair_and_shapes():
    with pytest.raises(ValueError, match=r"pair 1: .*\(2, 4, 4, 4\).*\(2, 4, 8, 8\)"):
        at_loss([torch.randn(2, 4, 4, 4)] * 2, [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)])


def test_pair_counts_must_match():
    with pytest.raises(ValueError, match="1 student and 2 teacher"):
        at_loss([torch.randn(2, 4, 4, 4)], [torch.randn(2, 4, 4, 4)] * 2)


def test_gradients_reach_the_student_features_only():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 6, 4, 4, requires_grad=True)
    at_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_default_pairs_for_the_paper_student():
    teacher = build_model(ModelConfig())
    student = build_model(ModelConfig(drop_blocks=5))
    assert len(teacher.features) == 19 and len(student.features) == 14
    assert default_pairs(student, teacher) == PAPER_STUDENT_PAIRS


def test_default_pairs_for_a_narrower_student():
    student = build_model(ModelConfig(drop_blocks=5, width_mult=0.5))
    assert default_pairs(student, build_model(ModelConfig())) == PAPER_STUDENT_PAIRS


def test_default_pairs_for_tiny_cnn():
    # Four blocks at 32, 16, 8 and 4 pixels: every block ends its own stage.
    teacher = build_model(ModelConfig(arch="tiny_cnn"))
    assert default_pairs(build_model(ModelConfig(arch="tiny_cnn")), teacher) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert default_pairs(build_model(ModelConfig(arch="tiny_cnn", drop_blocks=1)), teacher) == [(0, 0), (1, 1), (2, 2)]


def test_the_dry_forward_leaves_the_models_as_they_were():
    student, teacher = (
        build_model(ModelConfig(arch="tiny_cnn", drop_blocks=1)),
        build_model(ModelConfig(arch="tiny_cnn")),
    )
    before = {key: value.clone() for key, value in student.state_dict().items()}
    default_pairs(student, teacher)
    assert student.training
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())
    assert _no_hooks(student)


def test_check_pairs_accepts_the_default_pairs():
    teacher, student = build_model(ModelConfig()), build_model(ModelConfig(drop_blocks=5))
    check_pairs(student, teacher, PAPER_STUDENT_PAIRS)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(14, 14)], r"the student has feature blocks 0-13, not 14"),
        ([(3, 19)], r"the teacher has feature blocks 0-18, not 19"),
        ([(-1, 3)], r"not -1"),
        ([(3, 6)], r"student block 3 outputs 32x32 maps but teacher block 6 outputs 16x16"),
        ([(3,)], r"must be \[student block, teacher block\]"),
        ([], r"at least one"),
    ],
)
def test_check_pairs_rejects_bad_pairs_in_one_line(pairs, message):
    teacher, student = build_model(ModelConfig()), build_model(ModelConfig(drop_blocks=5))
    with pytest.raises(ConfigError, match=message) as error:
        check_pairs(student, teacher, pairs)
    assert "\n" not in str(error.value)


def test_taps_collect_outputs_in_the_order_of_the_indices():
    model = build_model(ModelConfig(arch="tiny_cnn")).eval()
    with FeatureTaps(model, [2, 0]) as taps, torch.no_grad():
        model(torch.rand(3, 3, 32, 32))
        shapes = [tuple(output.shape) for output in taps.outputs]
    assert shapes == [(3, 24, 8, 8), (3, 8, 32, 32)]


def test_taps_remove_their_hooks_on_exit():
    model = build_model(ModelConfig(arch="tiny_cnn"))
    with FeatureTaps(model, [0, 1]) as taps:
        model(torch.rand(2, 3, 32, 32))
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="no output"):
        taps.outputs  # noqa: B018 — the outputs are dropped with the hooks


def test_taps_remove_their_hooks_when_the_body_raises():
    model = build_model(ModelConfig(arch="tiny_cnn"))
    with pytest.raises(KeyError), FeatureTaps(model, [0, 3]):
        model(torch.rand(2, 3, 32, 32))
        raise KeyError("boom")
    assert _no_hooks(model)


def test_taps_with_a_bad_index_leave_no_hooks():
    model = build_model(ModelConfig(arch="tiny_cnn"))
    with pytest.raises(IndexError), FeatureTaps(model, [0, 9]):
        pass
    assert _no_hooks(model)


def test_taps_hold_only_the_latest_forward():
    model = build_model(ModelConfig(arch="tiny_cnn", drop_blocks=1)).eval()
    with FeatureTaps(model, [0, 2]) as taps, torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
        first = weakref.ref(taps.outputs[0])
        for _ in range(50):
            images = torch.rand(2, 3, 32, 32)
            model(images)
        assert first() is None
        assert len(taps.outputs) == 2
        assert torch.equal(taps.outputs[0], model.features[0](_normalised(model, images)))
        taps.clear()
        with pytest.raises(RuntimeError, match=r"features\[0\]"):
            taps.outputs  # noqa: B018
