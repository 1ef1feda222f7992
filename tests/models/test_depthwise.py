import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.models.depthwise import StridedDepthwiseConv2d, with_fp32_depthwise_backward


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False),  # strided depthwise: changed
        nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8),  # stride 1: unchanged
        nn.Conv2d(8, 16, 3, 2, 1, groups=4),  # grouped, not depthwise: unchanged
        nn.Conv2d(16, 16, 3, 2, 1, groups=16),  # strided depthwise with a bias: changed
        nn.Conv2d(16, 16, 3, 2, 1),  # dense: unchanged
    )


def test_only_strided_depthwise_convolutions_change_and_the_state_dict_stays():
    network = _network()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    assert with_fp32_depthwise_backward(network) == 2
    assert [type(module) is StridedDepthwiseConv2d for module in network] == [
        False, True, False, False, False, True, False
    ]  # fmt: skip
    assert all(isinstance(module, nn.Conv2d) for module in network if not isinstance(module, nn.ReLU6))
    after = network.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_values_are_the_stock_convolutions(autocast):
    stock, changed = _network(), _network()
    with_fp32_depthwise_backward(changed)
    images = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(stock(images), changed(images))


def _fp32_gradients(conv: nn.Conv2d, images: torch.Tensor, grad_output: torch.Tensor):
    """The gradients in fp32 arithmetic of the convolution on the bf16-rounded input, weight and bias."""
    tensors = (images, conv.weight) if conv.bias is None else (images, conv.weight, conv.bias)
    rounded = [t.detach().to(torch.bfloat16).float().requires_grad_(True) for t in tensors]
    output = F.conv2d(
        *rounded[:2], None if conv.bias is None else rounded[2], conv.stride, conv.padding, conv.dilation, conv.groups
    )
    output.backward(grad_output.float())
    return [t.grad for t in rounded]


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_under_bf16_is_fp32_arithmetic_on_the_bf16_tensors(channels_last):
    conv = nn.Conv2d(12, 12, 3, 2, 1, groups=12)
    with_fp32_depthwise_backward(conv)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(5, 12, 10, 10).contiguous(memory_format=memory_format).requires_grad_(True)
    grad_output = torch.randn(5, 12, 5, 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv(images)
    assert output.dtype == torch.bfloat16
    output.backward(grad_output)
    expected = _fp32_gradients(conv, images, grad_output)
    assert images.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    for got, want in zip((images.grad, conv.weight.grad, conv.bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_input_gradient_of_a_frozen_layer_matches_the_stock_bf16_one():
    """With frozen parameters (attribution) only the input's gradient is computed, from its shape alone."""
    stock = nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False).requires_grad_(False)
    changed = copy.deepcopy(stock)
    with_fp32_depthwise_backward(changed)
    images = torch.rand(6, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(6, 16, 6, 6).to(torch.bfloat16)
    gradients = []
    for conv in (stock, changed):
        leaf = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = conv(leaf)
        (gradient,) = torch.autograd.grad(output, leaf, grad_output)
        gradients.append(gradient)
    stock_gradient, changed_gradient = gradients
    assert changed.weight.grad is None
    torch.testing.assert_close(changed_gradient, _fp32_gradients(stock, images, grad_output)[0])
    # the stock bf16 gradient agrees to bf16 precision (the fp32 one is the more accurate)
    torch.testing.assert_close(changed_gradient, stock_gradient, rtol=2e-2, atol=2e-2)


def test_a_model_under_bf16_trains_to_the_same_gradients_as_the_stock_one():
    stock = _network()
    changed = copy.deepcopy(stock)
    with_fp32_depthwise_backward(changed)
    images, grads = torch.rand(8, 3, 32, 32), []
    for network in (stock, changed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = network(images).float().square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in network.parameters()]))
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
