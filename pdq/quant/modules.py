"""Quantized Conv2d / Linear: the float layer with a weight fake-quantizer in front of its weight.
Activation quantizers are separate graph nodes (see `pdq.quant.graph`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from pdq.quant.quantizers import WeightQuantizer


class QuantConv2d(nn.Conv2d):
    weight_quant: WeightQuantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int = 8) -> QuantConv2d:
        q = skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
        return _copy_params(q, conv, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    weight_quant: WeightQuantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8) -> QuantLinear:
        q = skip_init(cls, linear.in_features, linear.out_features, bias=linear.bias is not None)
        return _copy_params(q, linear, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_quant(self.weight), self.bias)


def _copy_params(q, layer: nn.Module, bits: int):
    """Frozen copies of the float layer's weight and bias, and a weight quantizer."""
    q.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    q.weight_quant = WeightQuantizer(bits, q.weight.shape[0])
    return q.train(layer.training)


QUANT_LAYERS = (QuantConv2d, QuantLinear)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
