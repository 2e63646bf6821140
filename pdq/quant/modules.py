"""Quantized Conv2d / Linear: the float layer with a weight fake-quantizer in front of its weight, and under a
runtime backend its bias on the int32 grid of scale s_in * s_w. Activation quantizers are separate graph nodes
(see `pdq.quant.graph`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from pdq.quant.functional import Grid, from_codes, to_codes
from pdq.quant.quantizers import ActQuantizer, WeightQuantizer

#: the grid of a runtime's bias codes
INT32 = Grid(32, signed=True, symmetric=True)


class _BiasMixin:
    """`link_bias(aq)`: the layer's input quantizer, whose scale times the weight scale is the bias's int32 grid
    (kept outside the module tree: it is another layer's). While both quantizers are active, the layer adds
    `quantized_bias()`, as a runtime's integer kernel does; else its float bias."""

    def link_bias(self, source: ActQuantizer | None) -> None:
        self.__dict__["bias_source"] = source

    def bias_scale(self) -> torch.Tensor | None:
        """s_in * s_w per output channel while the input and weight quantizers are active, else None."""
        source, wq = self.__dict__.get("bias_source"), self.weight_quant
        if self.bias is None or source is None or not source.active or not wq.active:
            return None
        return (source.scale.detach() * wq.scale.detach()).reshape(-1)

    def quantized_bias(self) -> torch.Tensor | None:
        scale = self.bias_scale()
        if scale is None:
            return self.bias
        zero = torch.zeros_like(scale)
        return from_codes(to_codes(self.bias.detach(), scale, zero, INT32), scale, zero)


class QuantConv2d(_BiasMixin, nn.Conv2d):
    weight_quant: WeightQuantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int = 8) -> QuantConv2d:
        q = skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
        return _copy_params(q, conv, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quant(self.weight), self.quantized_bias())


class QuantLinear(_BiasMixin, nn.Linear):
    weight_quant: WeightQuantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8) -> QuantLinear:
        q = skip_init(cls, linear.in_features, linear.out_features, bias=linear.bias is not None)
        return _copy_params(q, linear, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_quant(self.weight), self.quantized_bias())


def _copy_params(q, layer: nn.Module, bits: int):
    """Frozen copies of the float layer's weight and bias, and a weight quantizer."""
    q.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    q.weight_quant = WeightQuantizer(bits, q.weight.shape[0])
    return q.train(layer.training)


QUANT_LAYERS = (QuantConv2d, QuantLinear)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
