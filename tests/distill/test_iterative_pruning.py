"""Iterative pruning (k steps with recovery between them) and sparsity training before pruning (issue 29)."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import PruneConfig, TrainConfig, replace
from kdsearch.distill.train import train
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model, channel_plan, load_model
from kdsearch.models.pruning import GroupLasso, prune_classifier, prune_epochs, step_target
from tests.fakes import TINY


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("round_to", [None, 8])
def test_steps_end_at_the_one_shot_channel_counts(round_to):
    torch.manual_seed(0)
    unpruned = build_model(TINY)  # 8, 16, 24, 32 channels
    model, plans = unpruned, []
    for step in range(3):
        ratio, _ = step_target(0.5, None, step, 3)
        model = prune_classifier(model, ratio=ratio, round_to=round_to, reference=unpruned)
        plans.append(channel_plan(model))
    one_shot = channel_plan(prune_classifier(unpruned, ratio=0.5, round_to=round_to))
    assert plans[-1] == one_shot
    assert plans[0] != one_shot and all(a >= b for a, b in zip(plans[0], plans[1], strict=True))


def test_stage_ratios_step_by_step():
    assert step_target(None, (0.0, 0.6), 0, 3) == (None, (0.0, pytest.approx(0.2)))
    torch.manual_seed(0)
    unpruned = build_model(TINY)
    halfway = prune_classifier(unpruned, stage_ratios=(0.0, 0.25, 0.0, 0.25), round_to=None, reference=unpruned)
    last = prune_classifier(halfway, stage_ratios=(0.0, 0.5, 0.0, 0.5), round_to=None, reference=unpruned)
    assert channel_plan(halfway) == (8, 12, 24, 24) and channel_plan(last) == (8, 8, 24, 16)


def test_the_schedule_spreads_steps_over_the_epochs():
    assert prune_epochs(3, 15, sparsity=False) == (0, 5, 10)
    assert prune_epochs(3, 15, sparsity=True) == (3, 7, 11)  # the first quarter trains unpruned, sparse
    assert prune_epochs(1, 4, sparsity=True) == (2,)


def test_group_lasso_pulls_the_weakest_groups_hardest():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    GroupLasso(model, strength=1e-3, image_size=32)(model)
    assert model.training  # tracing the groups left the mode as it was
    first = model.features[0][0]  # 8 output channels: one group, gradient = strength x gamma x weight
    scale = (first.weight.grad / first.weight).flatten(1).mean(1) / 1e-3
    assert torch.all(scale >= 1 - 1e-4) and torch.all(scale <= 16 + 1e-3)
    norms = first.weight.detach().flatten(1).norm(dim=1)
    assert scale[norms.argmin()] > scale[norms.argmax()]  # gamma grows as the group's norm falls


@pytest.mark.parametrize(
    ("prune", "epochs", "message"),
    [
        (PruneConfig(ratio=0.5, steps=3), 2, "prune steps 3 need a prune target and at least 3 epochs"),
        (PruneConfig(ratio=0.5, sparsity=1e-4), 1, "after sparsity training need .* at least 2 epochs"),
        (PruneConfig(steps=2), 4, "need a prune target"),
    ],
)
def test_steps_must_fit_the_schedule(student_config, prune, epochs, message):
    with pytest.raises(ConfigError, match=message):
        replace(student_config, prune=prune, epochs=epochs)


def test_iterative_pruning_refuses_a_flops_target():
    with pytest.raises(ConfigError, match="take a ratio or stage_ratios, not flops_target"):
        PruneConfig(flops_target=0.5, steps=2)


def _iterative(student_config: TrainConfig, **prune) -> TrainConfig:
    return replace(
        student_config,
        student=replace(student_config.teacher),
        prune=PruneConfig(ratio=0.5, **prune),
        overlay=replace(student_config.overlay, p=0.0),
        optim=replace(student_config.optim, schedule="constant"),
        epochs=3,
    )


@pytest.mark.slow
def test_an_iterative_run_ends_at_the_target_and_resumes_bit_identical(student_config, tmp_path):
    config = _iterative(student_config, steps=3)
    whole = train(config, run_dir=tmp_path / "whole", progress=False)
    one_shot = channel_plan(prune_classifier(build_model(config.teacher), ratio=0.5))
    assert whole.model_config.channels == channel_plan(whole.model) == one_shot

    def stop_after_two(epoch, row):
        if epoch == 1:
            raise Interrupted  # after the second step's epoch: the checkpoint holds a part-pruned student

    with pytest.raises(Interrupted):
        train(config, run_dir=tmp_path / "cut", progress=False, on_epoch=stop_after_two)
    stored = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert stored["student_config"]["channels"] not in (None, list(one_shot), one_shot)
    resumed = train(config, run_dir=tmp_path / "cut", resume=True, progress=False)
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(resumed.model.eval()(images), whole.model.eval()(images))
    rebuilt, _ = load_model(tmp_path / "cut" / "model.pt")
    trained = whole.model.to(memory_format=torch.contiguous_format)  # trained channels_last
    assert torch.equal(rebuilt.eval()(images), trained(images))


@pytest.mark.slow
def test_sparsity_training_trains_unpruned_first_and_changes_the_result(student_config, tmp_path):
    plain = train(_iterative(student_config, steps=1, sparsity=0.0), progress=False)
    sparse = train(_iterative(student_config, steps=1, sparsity=1e-2), run_dir=tmp_path / "sparse", progress=False)
    assert sparse.model_config.channels == plain.model_config.channels  # same target, same shape
    images = torch.rand(4, 3, 32, 32)
    assert not torch.equal(sparse.model.eval()(images), plain.model.eval()(images))
    assert [row["epoch"] for row in sparse.history] == [1, 2, 3]
