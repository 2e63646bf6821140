"""Embedded reference models for 1x28x28 input, built from torchvision's own block classes so that
block discovery treats them exactly like the real networks."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: 3x3 stem, 3 stages of 3 BasicBlocks (16/32/64), 1x1 projection shortcuts."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), depth: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes, stages = widths[0], []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or inplanes != width:
                    down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(inplanes, width, stride, down))
                inplanes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetV2FMNIST(nn.Module):
    """MobileNetV2 for 28x28: stride-1 stem, torchvision InvertedResidual blocks (t, c, n, s) below,
    28 -> 14 -> 7 spatially, 1x1 conv to 384, global pool, dropout, linear."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1), (4, 96, 1, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 16, last: int = 384,
                 dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, stem, 3, 1, activation_layer=nn.ReLU6)]
        inp = stem
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(Conv2dNormActivation(inp, last, 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def resnet20_fmnist(num_classes: int = 10) -> ResNet20:
    return ResNet20(num_classes=num_classes)


def mobilenetv2_fmnist(num_classes: int = 10) -> MobileNetV2FMNIST:
    return MobileNetV2FMNIST(num_classes=num_classes)
