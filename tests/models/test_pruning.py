import json

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from kdsearch.config import ModelConfig
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import apply_plan, build_model, channel_plan, count_flops, count_parameters
from kdsearch.models.pruning import IMPORTANCES, model_stages, prune_classifier

STUDENT = ModelConfig(arch="mobilenetv2_cifar", drop_blocks=5)
NARROW_TEACHER = ModelConfig(arch="mobilenetv2_cifar", width_mult=0.5)  # all 19 blocks, half the channels
TINY = ModelConfig(arch="tiny_cnn")  # convolutions of 8, 16, 24, 32 channels


def _model(config: ModelConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config)


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return _model(STUDENT)


@pytest.fixture(scope="module")
def pruned_student(student) -> nn.Module:
    return prune_classifier(student, ratio=0.5)


@pytest.mark.parametrize(
    ("ratio", "round_to", "plan"),
    [
        (0.5, None, (4, 8, 12, 16)),
        (0.3, None, (5, 11, 16, 22)),  # floor(channels * 0.7)
        (0.5, 8, (8, 8, 8, 16)),  # 4 -> 8 (the floor: a group narrower than round_to stays whole), 12 -> 8
        (0.3, 8, (8, 8, 16, 16)),  # rounded down: 11 -> 8, 22 -> 16
    ],
)
def test_ratio_removes_that_fraction_of_each_group(ratio, round_to, plan):
    model = _model(TINY)
    pruned = prune_classifier(model, ratio=ratio, round_to=round_to)
    assert channel_plan(pruned) == plan
    assert count_flops(pruned) < count_flops(model)
    assert pruned.classifier[1].in_features == plan[-1] and pruned.classifier[1].out_features == 10


@pytest.mark.slow
def test_mobilenetv2_loses_about_half_its_channels(student, pruned_student):
    before, after = sum(channel_plan(student)), sum(channel_plan(pruned_student))
    assert 0.45 < after / before <= 0.5  # rounding to 8 only lifts the narrowest groups above half
    assert all(count % 8 == 0 for count in channel_plan(pruned_student))
    assert count_flops(pruned_student) < 0.35 * count_flops(student)  # FLOPs scale with in x out channels
    _, reported = tp.utils.count_ops_and_params(pruned_student, torch.zeros(1, 3, 32, 32))
    assert count_parameters(pruned_student) == reported < count_parameters(student)


def test_pruned_model_keeps_input_and_output_shapes(pruned_student):
    assert pruned_student.features[0][0].in_channels == 3
    assert pruned_student.eval()(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_residual_and_depthwise_channels_stay_consistent(pruned_student):
    blocks = [block for block in pruned_student.features if isinstance(block, InvertedResidual)]
    assert sum(block.use_res_connect for block in blocks) == 8  # every repeat within a stage: 1 + 2 + 3 + 2
    for block in blocks:
        convs = [module for module in block.modules() if isinstance(module, nn.Conv2d)]
        assert convs[0].in_channels == block.conv[0][0].in_channels
        if block.use_res_connect:
            assert convs[-1].out_channels == convs[0].in_channels  # the add joins equal counts
        depthwise = [conv for conv in convs if conv.groups > 1]
        assert len(depthwise) == 1
        assert depthwise[0].groups == depthwise[0].in_channels == depthwise[0].out_channels
        norms = [module for module in block.modules() if isinstance(module, nn.BatchNorm2d)]
        assert [norm.num_features for norm in norms] == [conv.out_channels for conv in convs]


def test_input_model_is_unchanged_and_mode_kept():
    model = _model(STUDENT).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pruned = prune_classifier(model, ratio=0.5)
    assert pruned.training
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_surviving_channels_keep_their_weights(student, pruned_student):
    # The stem keeps all three image channels, so each kept filter is one of the original filters.
    original, kept = student.features[0][0].weight, pruned_student.features[0][0].weight
    assert len(kept) < len(original)
    assert all(any(torch.equal(row, candidate) for candidate in original) for row in kept)


def test_magnitude_importances_are_deterministic(student):
    for importance in ("l1", "l2"):
        first = prune_classifier(_model(TINY), ratio=0.4, importance=importance, round_to=None)
        torch.manual_seed(123)  # the global RNG must not matter
        second = prune_classifier(_model(TINY), ratio=0.4, importance=importance, round_to=None)
        first_state, second_state = first.state_dict(), second.state_dict()
        assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    l1, l2 = (prune_classifier(student, ratio=0.5, importance=name) for name in ("l1", "l2"))
    assert set(IMPORTANCES) == {"l1", "l2", "random", "taylor"}
    assert not torch.equal(l1.features[0][0].weight, l2.features[0][0].weight)  # different rankings


def test_random_importance_follows_its_seed(student):
    def stem(seed: int) -> torch.Tensor:
        return prune_classifier(student, ratio=0.5, importance="random", seed=seed).features[0][0].weight

    first = stem(0)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(stem(0), first)
    assert not torch.equal(stem(1), first)


@pytest.mark.parametrize("config", [STUDENT, NARROW_TEACHER, TINY], ids=["student", "narrow_teacher", "tiny_cnn"])
def test_plan_rebuilds_the_pruned_model_after_a_json_round_trip(config):
    round_to = None if config is TINY else 8
    pruned = prune_classifier(_model(config), ratio=0.5, round_to=round_to).eval()
    plan = json.loads(json.dumps(channel_plan(pruned)))
    # Each conv keeps half its channels, rounded down to a multiple of 8 but not below 8 (a group of 8 or
    # fewer stays whole): e.g. tiny_cnn's 8, 16, 24, 32 without rounding -> 4, 8, 12, 16; 96 -> 48; 24 -> 8.
    assert plan == [_half(width, round_to) for width in channel_plan(_model(config))]
    if config is TINY:
        assert plan == [4, 8, 12, 16]
    rebuilt = apply_plan(_model(config, seed=1), plan)  # fresh weights: the pruned model is not needed
    assert channel_plan(rebuilt) == tuple(plan)
    shapes = {key: value.shape for key, value in pruned.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(pruned.state_dict())
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), pruned(images))


def _half(width: int, round_to: int | None) -> int:
    kept = max(1, width // 2)
    if round_to is None:
        return kept
    return width if width <= round_to else max(round_to, kept // round_to * round_to)


@pytest.mark.slow
def test_flops_target_is_met_with_the_least_pruning():
    model = _model(TINY)
    full = count_flops(model)
    pruned = prune_classifier(model, flops_target=0.4, round_to=None)
    assert count_flops(pruned) <= 0.4 * full
    # Every plan a ratio can give (floor(channels * (1 - ratio)) per group): the largest within the
    # target is the one chosen.
    plans = {tuple(int(width * (1 - step / 1000)) or 1 for width in (8, 16, 24, 32)) for step in range(1, 1000)}
    within = [flops for flops in (count_flops(apply_plan(model, plan)) for plan in plans) if flops <= 0.4 * full]
    assert count_flops(pruned) == max(within)


@pytest.mark.slow
def test_flops_target_on_mobilenetv2_with_rounding(student):
    pruned = prune_classifier(student, flops_target=0.5)
    assert 0.4 * count_flops(student) < count_flops(pruned) <= 0.5 * count_flops(student)
    assert all(count % 8 == 0 for count in channel_plan(pruned))


def test_unreachable_flops_target():
    with pytest.raises(ConfigError, match="flops_target=0.1 is out of reach"):
        prune_classifier(_model(TINY), flops_target=0.1, round_to=8)  # tiny_cnn's widths are 8..32


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=f"ratio must be in \\(0, 1\\) but got {ratio}"):
        prune_classifier(_model(TINY), ratio=ratio)


def test_bad_flops_target():
    with pytest.raises(ConfigError, match="flops_target must be in \\(0, 1\\) but got 1.2"):
        prune_classifier(_model(TINY), flops_target=1.2)


@pytest.mark.parametrize(
    "kwargs", [{}, {"ratio": 0.5, "flops_target": 0.5}, {"ratio": 0.5, "stage_ratios": (0.5, 0.5, 0.5, 0.5)}]
)
def test_exactly_one_target(kwargs):
    with pytest.raises(ConfigError, match="exactly one of ratio, flops_target and stage_ratios"):
        prune_classifier(_model(TINY), **kwargs)


def test_unknown_importance_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'hessian'; known: l1, l2, random, taylor"):
        prune_classifier(_model(TINY), ratio=0.5, importance="hessian")


def test_each_stage_loses_its_own_fraction():
    model = _model(TINY)  # one convolution per resolution: 32, 16, 8, 4 pixels
    assert model_stages(model) == 4
    pruned = prune_classifier(model, stage_ratios=(0.0, 0.5, 0.0, 0.5), round_to=None)
    assert channel_plan(pruned) == (8, 8, 24, 16)


def test_mobilenetv2_stages_are_its_resolutions(student):
    assert model_stages(student) == 3  # the paper's student: 32, 16 and 8 pixels
    pruned = prune_classifier(student, stage_ratios=(0.0, 0.0, 0.5))
    widths = {
        name: module.out_channels for name, module in pruned.features.named_modules() if isinstance(module, nn.Conv2d)
    }
    full = {
        name: module.out_channels for name, module in student.features.named_modules() if isinstance(module, nn.Conv2d)
    }
    changed = {name.split(".")[0] for name in full if widths[name] != full[name]}
    assert changed and all(int(block) >= 7 for block in changed)  # blocks 7 on run at 8x8 pixels


def test_stage_ratios_must_match_the_stages():
    with pytest.raises(
        ConfigError,
        match="stage_ratios gives 2 ratios but the model has 4 stages \\(convolution outputs at 32x32, 16x16, 8x8, 4x4\\)",
    ):
        prune_classifier(_model(TINY), stage_ratios=(0.5, 0.5))


def _calibration(labels_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(labels_seed)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, torch.randint(0, 10, (64,), generator=generator)


def test_taylor_ranks_channels_by_the_gradients_of_the_calibration_loss():
    model = _model(TINY)
    ranked = [
        prune_classifier(model, ratio=0.5, round_to=None, importance="taylor", calibration=_calibration(s))
        for s in (0, 0, 1)
    ]
    kept = [[weight.flatten().tolist() for weight in (m.features[1][0].weight,)] for m in ranked]
    assert kept[0] == kept[1]  # deterministic
    assert kept[0] != kept[2]  # other labels, other gradients, other channels kept
    magnitude = prune_classifier(model, ratio=0.5, round_to=None)
    assert kept[0] != [magnitude.features[1][0].weight.flatten().tolist()]
    assert all(parameter.grad is None for parameter in model.parameters())  # the input model is untouched


def test_taylor_needs_calibration_images():
    with pytest.raises(ConfigError, match="importance taylor needs calibration images"):
        prune_classifier(_model(TINY), ratio=0.5, importance="taylor")


def test_bad_round_to():
    with pytest.raises(ConfigError, match="round_to must be a positive integer or None but got 0"):
        prune_classifier(_model(TINY), ratio=0.5, round_to=0)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ([8, 8, 8], "3 entries but the model has 4"),
        ([8, 0, 8, 8], "positive integers"),
        ([8, 8, 8, 8.5], "positive integers"),
    ],
)
def test_bad_plan(plan, message):
    with pytest.raises(ConfigError, match=message):
        apply_plan(build_model(TINY), plan)


def test_plan_must_keep_depthwise_and_residual_counts(student):
    plan = list(channel_plan(student))
    depthwise = plan.copy()
    depthwise[1] = 8  # features.1's depthwise conv must keep the stem's 32
    with pytest.raises(ConfigError, match="depthwise conv"):
        apply_plan(student, depthwise)
    residual = plan.copy()
    residual[8] = 16  # the second 24-channel block's projection feeds a residual add with 24 channels
    with pytest.raises(ConfigError, match="does not fit"):
        apply_plan(student, residual)


def test_grouped_convolutions_lose_the_same_positions_in_every_group():
    torch.manual_seed(0)
    grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # as in ResNeXt and RegNet blocks
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), grouped, nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    pruned = prune_classifier(model, ratio=0.5, round_to=None).eval()
    conv = pruned[3]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (8, 8, 4)
    assert pruned(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # The first convolution's kept channels are the same two positions of each of the 4 input groups.
    kept = [i for i in range(16) if any(torch.equal(model[0].weight[i], w) for w in pruned[0].weight)]
    assert len(kept) == 8 and len({i % 4 for i in kept}) == 2
