"""Backward pass of strided depthwise convolutions under CPU bf16 autocast: PyTorch's own vs kdsearch's fp32.

    .venv/bin/python bench/depthwise_backward.py 2>&1 | tee bench/out/depthwise_backward.txt

For each strided depthwise convolution of the CIFAR MobileNetV2 teacher (shapes found by running it on
a batch of ``--batch`` 32-pixel images), in the same run: forward + backward under bf16 autocast of the
stock ``nn.Conv2d`` and of ``kdsearch.models.depthwise.StridedDepthwiseConv2d`` (same parameters), with
frozen parameters (the input's gradient only: what attribution methods compute) and with trainable ones
(the input's and the weight's: what training computes). Each timing is the fastest of ``--repeats``
rounds of ``--calls`` calls, the two variants alternating; ratios are stock / kdsearch. The last line
is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from common import header, machine
from torch import nn

from kdsearch.config import ModelConfig
from kdsearch.models.classifiers import build_model
from kdsearch.models.depthwise import with_fp32_depthwise_backward


def strided_depthwise_inputs(batch: int) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """(layer, input shape) of each strided depthwise convolution of the teacher architecture."""
    model = build_model(ModelConfig()).eval()
    found = []

    def record(module, inputs, output):
        found.append((module, tuple(inputs[0].shape)))

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    handles = [m.register_forward_hook(record) for m in layers if m.stride != (1, 1)]
    with torch.no_grad():
        model(torch.rand(batch, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return found


def step_seconds(layer: nn.Conv2d, images: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        leaf = images.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = layer(leaf)
        output.backward(torch.ones_like(output))
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    header("Strided depthwise backward under bf16 autocast (bench/depthwise_backward.py)", info)
    print(f"command: {' '.join(sys.argv)}")
    print(f"bf16 native (oneDNN): {info.get('mkldnn_bf16')}; batch {args.batch}; channels_last inputs")
    rows = []
    print(f"{'input shape':<22} {'parameters':<10} {'stock ms':>9} {'kdsearch ms':>11} {'ratio':>7}")
    for layer, shape in strided_depthwise_inputs(args.batch):
        images = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        for trainable in (False, True):
            stock = copy.deepcopy(layer).requires_grad_(trainable)
            changed = copy.deepcopy(stock)
            with_fp32_depthwise_backward(changed)
            timings = {"stock": [], "kdsearch": []}
            for variant in (stock, changed):
                step_seconds(variant, images, 1)  # oneDNN primitives
            for _ in range(args.repeats):
                timings["stock"].append(step_seconds(stock, images, args.calls))
                timings["kdsearch"].append(step_seconds(changed, images, args.calls))
            stock_ms, kdsearch_ms = min(timings["stock"]) * 1e3, min(timings["kdsearch"]) * 1e3
            kind = "trainable" if trainable else "frozen"
            rows.append({"input_shape": shape, "parameters": kind, "stock_ms": stock_ms, "kdsearch_ms": kdsearch_ms})
            print(f"{str(shape):<22} {kind:<10} {stock_ms:>9.2f} {kdsearch_ms:>11.2f} {stock_ms / kdsearch_ms:>6.1f}x")
    print(json.dumps({"bench": "depthwise_backward", "machine": info, "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
