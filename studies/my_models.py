"""A model factory of your own, as studies/own-factory.yaml names it: `python:studies.my_models:small_resnet`.

kdsearch imports MODULE as Python would from the directory it runs in, calls the factory with
``num_classes``, and expects a torch.nn.Module that maps (B, 3, H, W) images in kdsearch's input
normalisation to (B, num_classes) logits.
"""

from torch import nn


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


def small_resnet(num_classes: int) -> nn.Module:
    """Four conv stages (32, 64, 128, 256 channels), about 1.2 M parameters, for 32-pixel images."""
    trunk = nn.Sequential(_block(3, 32, 1), _block(32, 64, 2), _block(64, 128, 2), _block(128, 256, 2))
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))
