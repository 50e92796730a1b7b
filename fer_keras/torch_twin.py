"""The PyTorch twin of :func:`fer_keras.model.resnet18`, the reference of the speed benchmark.

A speed comparison is only meaningful when both sides train the same network, so the twin has
the same BasicBlocks, the same three stems, the same parameter count and, after
:func:`copy_keras_weights`, computes the same function (tests/test_benchmark.py checks both):

* ``imagenet``: 7x7/2 conv (pad 3) + 3x3/2 max-pool (pad 1);
* ``cifar_pool``: 3x3/1 conv (pad 1) + 2x2/2 max-pool;
* ``cifar``: 3x3/1 conv (pad 1), no pool.

Like the Keras model it takes raw 0-255 pixels ``(N, 1, 48, 48)``, normalises them inside, uses
BatchNorm momentum 0.1 / eps 1e-5, dropout before the classifier, and keeps the classifier in
float32 under bfloat16 autocast (Keras' ``mixed_bfloat16`` keeps the logits layer float32).
PyTorch is an optional dependency (``pip install fer_keras[benchmark]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fer_keras import BLOCKS_PER_STAGE, BN_EPSILON, FER2013_MEAN, FER2013_STD, NUM_CLASSES, STAGE_WIDTHS, STEMS

if TYPE_CHECKING:
    import keras

BN_MOMENTUM = 0.1  # fer_keras.model's 0.9 in PyTorch's convention (not imported: that module loads Keras)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), add, ReLU."""

    def __init__(self, in_channels: int, filters: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, filters, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, stride=1, padding=1, bias=False)
        self.bn2 = _bn(filters)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != filters:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, filters, 1, stride=stride, bias=False), _bn(filters))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 on raw pixels ``(N, 1, 48, 48)`` in 0-255, returning float32 logits ``(N, 7)``."""

    def __init__(self, stem: str = "cifar_pool", num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self.stem_name = stem
        self.scale = 1.0 / (255.0 * FER2013_STD)
        self.offset = -FER2013_MEAN / FER2013_STD
        if stem == "imagenet":
            conv = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
            pool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            conv = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
            pool = nn.MaxPool2d(2, stride=2) if stem == "cifar_pool" else nn.Identity()
        self.stem = nn.Sequential(conv, _bn(64), nn.ReLU(inplace=True), pool)
        blocks = []
        in_channels = 64
        for stage, width in enumerate(STAGE_WIDTHS, start=1):
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 1 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels * self.scale + self.offset
        x = self.blocks(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.features(pixels))
        # The classifier stays float32 under autocast, as the Keras logits layer does.
        with torch.autocast("cpu", enabled=False):
            return self.fc(x.float())


def resnet18(stem: str = "cifar_pool", dropout: float = 0.0, num_classes: int = NUM_CLASSES) -> ResNet18:
    return ResNet18(stem, num_classes, dropout)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def copy_keras_weights(twin: ResNet18, keras_model: keras.Model) -> ResNet18:
    """Copies a fer_keras ResNet-18's weights (1 input channel, same stem) into the twin.

    Used to prove that the twin computes the same function as the Keras model, not only that
    it has as many parameters.
    """

    def conv(target: nn.Conv2d, layer) -> None:
        # Keras HWIO -> PyTorch OIHW.
        target.weight.data = torch.from_numpy(np.transpose(np.asarray(layer.kernel), (3, 2, 0, 1)).copy())

    def bn(target: nn.BatchNorm2d, layer) -> None:
        for name, source in (("weight", layer.gamma), ("bias", layer.beta),
                             ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance)):
            getattr(target, name).data = torch.from_numpy(np.asarray(source, np.float32).copy())

    conv(twin.stem[0], keras_model.get_layer("stem_conv"))
    bn(twin.stem[1], keras_model.get_layer("stem_bn"))
    index = 0
    for stage in range(1, len(STAGE_WIDTHS) + 1):
        for block in range(1, BLOCKS_PER_STAGE + 1):
            source = keras_model.get_layer(f"stage{stage}_block{block}")
            target = twin.blocks[index]
            conv(target.conv1, source.conv1)
            bn(target.bn1, source.bn1)
            conv(target.conv2, source.conv2)
            bn(target.bn2, source.bn2)
            if source.shortcut_conv is not None:
                conv(target.shortcut[0], source.shortcut_conv)
                bn(target.shortcut[1], source.shortcut_bn)
            index += 1
    dense = keras_model.get_layer("logits")
    twin.fc.weight.data = torch.from_numpy(np.asarray(dense.kernel, np.float32).T.copy())
    twin.fc.bias.data = torch.from_numpy(np.asarray(dense.bias, np.float32).copy())
    return twin
