"""The PD-Quant paper's ImageNet models (spec §2.3), laid out like BRECQ's `models/*.py` so that their
`state_dict()` keys are those of the BRECQ release checkpoints (`resnet18_imagenet.pth.tar`,
`resnet50_imagenet.pth.tar`, `mobilenetv2.pth.tar` (under key `model`), `regnet_600m.pth.tar`,
`regnet_3200m.pth.tar`, `mnasnet.pth.tar`), which `model.checkpoint=PATH` loads.

torchvision blocks are used where the parameter names are BRECQ's too (ResNet's BasicBlock/Bottleneck,
MNasNet's `_InvertedResidual`, the conv+BN+act stems); BRECQ's MobileNetV2 inverted residual and RegNet
bottleneck name their layers differently and are defined here. Their reconstruction units are found from
the graph (`pdq.recon.units`), like any model's."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.mnasnet import _InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from pdq.models.fmnist import init_weights
from pdq.models.registry import register_model

# --------------------------------------------------------------------------------------------- ResNet


class ResNetBRECQ(nn.Module):
    """BRECQ's `ResNet` (torchvision's layout: conv1, bn1, layer1-4 of BasicBlock/Bottleneck, fc).
    As BRECQ's hubconf builds it: 7x7 stem, 1x1 strided conv + BN shortcut (spec §2.3). The class also
    has BRECQ's `deep_stem` (conv1 = three 3x3 convs 3->32->32->64, keys conv1.0/.1/.3/.4/.6) and
    `avg_down` (shortcut AvgPool + 1x1 conv + BN, keys downsample.1/.2) options; a checkpoint saved with
    either is recognised by its keys and the model switches to that layout before loading it."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 deep_stem: bool = False, avg_down: bool = False):
        super().__init__()
        self.block, self.depths, self.num_classes = block, tuple(layers), num_classes
        self._build(deep_stem, avg_down)

    def _build(self, deep_stem: bool, avg_down: bool) -> None:
        self.deep_stem, self.avg_down = deep_stem, avg_down
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, expansion = 64, self.block.expansion
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), self.depths)):
            stride, blocks = (1 if i == 0 else 2), []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * expansion):
                    out = planes * expansion
                    down = (nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                          nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
                            if avg_down else
                            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
                blocks.append(self.block(inplanes, planes, stride if j == 0 else 1, down))
                inplanes = planes * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * expansion, self.num_classes)
        init_weights(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # runs before the children load: take the stem/shortcut layout the checkpoint was saved with
        deep = f"{prefix}conv1.0.weight" in state_dict
        avg_down = any(k.startswith(f"{prefix}layer") and k.endswith(".downsample.2.weight") for k in state_dict)
        if (deep, avg_down) != (self.deep_stem, self.avg_down):
            self._build(deep, avg_down)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18_brecq", release_file="resnet18_imagenet.pth.tar")
def resnet18_brecq(num_classes: int = 1000, **kwargs) -> ResNetBRECQ:
    return ResNetBRECQ(BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


@register_model("resnet50_brecq", release_file="resnet50_imagenet.pth.tar")
def resnet50_brecq(num_classes: int = 1000, **kwargs) -> ResNetBRECQ:
    return ResNetBRECQ(Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


# ---------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidualBRECQ(nn.Module):
    """BRECQ's MobileNetV2 block: one flat `conv` Sequential (t=1: dw, BN, ReLU6, pw-linear, BN;
    else pw, BN, ReLU6, dw, BN, ReLU6, pw-linear, BN); residual add when stride 1 and inp == oup."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        self.expand_ratio = expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2BRECQ(nn.Module):
    """BRECQ's MobileNetV2 (width 1.0): features[0] conv3x3 s2 + BN + ReLU6, features[1..17] inverted
    residuals (t, c, n, s) below, features[18] conv1x1 -> 1280 + BN + ReLU6, `x.mean([2, 3])`,
    classifier = Dropout(0.0), Linear."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, 32, 3, 2, activation_layer=nn.ReLU6)]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidualBRECQ(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(Conv2dNormActivation(inp, 1280, 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean([2, 3]))


@register_model("mobilenetv2_brecq", release_file="mobilenetv2.pth.tar")
def mobilenetv2_brecq(num_classes: int = 1000) -> MobileNetV2BRECQ:
    return MobileNetV2BRECQ(num_classes)


# ----------------------------------------------------------------------------------------------- RegNetX


class SimpleStemIN(nn.Module):
    """RegNet stem: conv3x3 s2, BN, ReLU (keys stem.conv, stem.bn)."""

    def __init__(self, w_in: int, w_out: int):
        super().__init__()
        self.conv = nn.Conv2d(w_in, w_out, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(w_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class BottleneckTransform(nn.Module):
    """1x1 (a), grouped 3x3 (b), 1x1 (c), each with BN (a_bn, b_bn, c_bn); ReLU after a and b.
    RegNetX: bottleneck multiplier 1, no squeeze-excitation."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_out, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_out)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_out, w_out, 3, stride, 1, groups=w_out // group_width, bias=False)
        self.b_bn = nn.BatchNorm2d(w_out)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_out, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b_relu(self.b_bn(self.b(self.a_relu(self.a_bn(self.a(x))))))
        return self.c_bn(self.c(x))


class ResBottleneckBlock(nn.Module):
    """relu(shortcut + f(x)); the shortcut is proj (1x1, stride) + bn when the shape changes."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = BottleneckTransform(w_in, w_out, stride, group_width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return self.relu(shortcut + self.f(x))


class AnyStage(nn.Module):
    """`d` blocks b1..bd; the first one takes the stride and the width change."""

    def __init__(self, w_in: int, w_out: int, stride: int, d: int, group_width: int):
        super().__init__()
        for i in range(d):
            self.add_module(f"b{i + 1}", ResBottleneckBlock(w_in if i == 0 else w_out, w_out,
                                                            stride if i == 0 else 1, group_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class AnyHead(nn.Module):
    def __init__(self, w_in: int, num_classes: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avg_pool(x), 1))


class RegNetX(nn.Module):
    """BRECQ's RegNet (pycls AnyNet layout): stem (32 ch), stages s1..s4 of stride 2, head.fc.
    Stage widths/depths are what BRECQ's `generate_regnet` + `adjust_ws_gs_comp` give for its configs
    (600M: WA 36.97, W0 48, WM 2.24, DEPTH 16; 3200M: WA 26.31, W0 88, WM 2.25, DEPTH 25)."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], group_width: int, num_classes: int = 1000):
        super().__init__()
        self.stem = SimpleStemIN(3, 32)
        w_in = 32
        for i, (w, d) in enumerate(zip(widths, depths)):
            self.add_module(f"s{i + 1}", AnyStage(w_in, w, 2, d, group_width))
            w_in = w
        self.head = AnyHead(w_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


@register_model("regnetx_600m", release_file="regnet_600m.pth.tar")
def regnetx_600m(num_classes: int = 1000) -> RegNetX:
    return RegNetX((48, 96, 240, 528), (1, 3, 5, 7), 24, num_classes)


@register_model("regnetx_3200m", release_file="regnet_3200m.pth.tar")
def regnetx_3200m(num_classes: int = 1000) -> RegNetX:
    return RegNetX((96, 192, 432, 1008), (2, 6, 15, 2), 48, num_classes)


# ----------------------------------------------------------------------------------------------- MNasNet


class MNASNetBRECQ(nn.Module):
    """BRECQ's MNASNet (scale 2.0; torchvision's v2 layout): `layers` = conv3x3 s2 + BN + ReLU,
    depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN (no ReLU), six stacks of torchvision
    `_InvertedResidual` blocks (3,3,3,2,4,1), conv1x1 -> 1280 + BN + ReLU; `x.mean([2, 3])`;
    classifier = Dropout(0.0), Linear."""

    DEPTHS = (64, 32, 48, 80, 160, 192, 384, 640)  # _get_depths(2.0)
    STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))  # k, s, t, n

    def __init__(self, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        d = self.DEPTHS
        layers: list[nn.Module] = [
            nn.Conv2d(3, d[0], 3, 2, 1, bias=False), nn.BatchNorm2d(d[0]), nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[0], 3, 1, 1, groups=d[0], bias=False), nn.BatchNorm2d(d[0]), nn.ReLU(inplace=True),
            nn.Conv2d(d[0], d[1], 1, bias=False), nn.BatchNorm2d(d[1])]
        for (k, s, t, n), c_in, c_out in zip(self.STACKS, d[1:], d[2:]):
            layers.append(nn.Sequential(*[_InvertedResidual(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, t)
                                          for i in range(n)]))
        layers += [nn.Conv2d(d[-1], 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))


@register_model("mnasnet_x2", release_file="mnasnet.pth.tar")
def mnasnet_x2(num_classes: int = 1000) -> MNASNetBRECQ:
    return MNASNetBRECQ(num_classes)
