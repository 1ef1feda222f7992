"""Strided depthwise convolutions whose backward pass runs in fp32 under CPU bf16 autocast.

Why: with torch 2.14 on a CPU with AVX512-BF16 (AMD EPYC, Zen 4), the backward pass of a bf16 depthwise
convolution with stride 2 takes a slow path: 60-74 ms for a batch of 64 at MobileNetV2's shapes, against
0.3-3 ms for the same gradient computed in fp32 from the bf16 tensors, and 0.3-4 ms for stride 1 in bf16
(bench/depthwise_backward.py). In the CIFAR MobileNetV2 teacher's input-gradient pass, which IG and every
other attribution method repeat, its three such layers took half the time. The forward pass stays in
bf16 (as fast, and the same numbers as before); only the backward pass changes, from bf16 to fp32
arithmetic on the same bf16 inputs, so gradients are at least as accurate as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _Fp32Backward(torch.autograd.Function):
    """conv2d in bf16 forward, its gradients computed in fp32 backward (cast back to the inputs' dtypes)."""

    @staticmethod
    def forward(ctx, images, weight, bias, stride, padding, dilation, groups):
        with torch.autocast("cpu", enabled=False):
            images_bf16, weight_bf16 = images.to(torch.bfloat16), weight.to(torch.bfloat16)
            output = F.conv2d(
                images_bf16,
                weight_bf16,
                None if bias is None else bias.to(torch.bfloat16),
                stride,
                padding,
                dilation,
                groups,
            )
        # The input's values are needed only for the weight's gradient; its shape suffices otherwise.
        ctx.save_for_backward(images_bf16 if ctx.needs_input_grad[1] else None, weight_bf16)
        ctx.images = (images.shape, images.dtype, images.is_contiguous(memory_format=torch.channels_last))
        ctx.weight_dtype, ctx.has_bias = weight.dtype, bias is not None
        ctx.conv = (stride, padding, dilation, groups)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        images_bf16, weight_bf16 = ctx.saved_tensors
        shape, images_dtype, channels_last = ctx.images
        stride, padding, dilation, groups = ctx.conv
        if images_bf16 is not None:
            images = images_bf16.float()
        else:  # never read: convolution_backward takes the input for its shape when only grad_input is asked
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            images = torch.empty(shape, dtype=torch.float32, memory_format=memory_format)
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_images, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output.float(),
            images,
            weight_bf16.float(),
            [weight_bf16.shape[0]] if ctx.has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            wanted,
        )
        return (
            None if grad_images is None else grad_images.to(images_dtype),
            None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


def _bf16_autograd_on_cpu(images: torch.Tensor) -> bool:
    return (
        images.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class StridedDepthwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, state dict and forward values) whose backward pass under CPU bf16
    autocast is computed in fp32; anywhere else (fp32, no gradients, CUDA) it is the stock convolution."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or not _bf16_autograd_on_cpu(images):
            return super().forward(images)
        return _Fp32Backward.apply(
            images, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _is_strided_depthwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.groups > 1
        and module.groups == module.in_channels
        and module.stride != (1, 1)
        and isinstance(module.padding, tuple)  # not "same"/"valid", which the fp32 backward would need to resolve
    )


def with_fp32_depthwise_backward(model: nn.Module) -> int:
    """Gives ``model``'s strided depthwise convolutions (in place) an fp32 backward pass under CPU bf16
    autocast; the number of layers changed. Parameters, state dict and forward values are unchanged."""
    changed = 0
    for module in model.modules():
        if _is_strided_depthwise(module):
            module.__class__ = StridedDepthwiseConv2d
            changed += 1
    return changed
