"""kdsearch.models.inference: logits and accuracy in eval mode, fp32 with BatchNorm folded in a copy."""

from __future__ import annotations

import math

import torch

from kdsearch.config import ModelConfig
from kdsearch.models.classifiers import build_model, weights_hash
from kdsearch.models.inference import accuracy, predict_logits

CPU = torch.device("cpu")


def _trained_mobilenet() -> torch.nn.Module:
    """A small MobileNetV2 whose BatchNorm statistics are not the identity (so folding them matters)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mobilenetv2_cifar", drop_blocks=12))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32) * 2)
    return model


def test_logits_equal_the_eval_mode_forward_and_leave_the_model_as_it_was():
    model = _trained_mobilenet()
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    before = weights_hash(model)
    logits = predict_logits(model, images, 32, CPU, None)
    assert model.training and weights_hash(model) == before  # folded in a copy; the mode is untouched
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    with torch.no_grad():
        expected = model.eval()(images.float() / 255)
    assert logits.shape == (70, 10) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # Batches of any size give the same logits (eval mode: no statistic crosses images).
    torch.testing.assert_close(predict_logits(model, images, 7), logits, atol=1e-5, rtol=1e-5)


def test_accuracy_counts_the_argmax_hits():
    model = _trained_mobilenet()
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    predicted = predict_logits(model, images).argmax(dim=1)
    labels = predicted.clone()
    labels[:13] = (labels[:13] + 1) % 10
    assert accuracy(model, images, labels) == 100.0 * 37 / 50
    assert math.isnan(accuracy(model, images[:0], labels[:0]))


def test_under_bf16_autocast_the_model_runs_as_it_is_so_accuracies_stay_comparable():
    model = _trained_mobilenet()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    logits = predict_logits(model, images, 40, CPU, torch.bfloat16)
    assert model.training
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.eval()(images.float().div(255).contiguous(memory_format=torch.channels_last)).float()
    assert torch.equal(logits, expected)  # not folded: folding would round the bf16 weights differently
