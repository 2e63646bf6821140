"""AdaRound learned rounding (spec §1.5): W~ = s * (clamp(floor(W/s) + h(V) + z, 0, 2^b - 1) - z),
h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), V initialised so that h(V) = frac(W/s)."""

from __future__ import annotations

import torch
from torch import nn

from pdq.quant.functional import broadcast_to_channel, qmax
from pdq.quant.quantizers import WeightQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    """Replaces a layer's (calibrated) `WeightQuantizer` while its unit is reconstructed. `soft=True`
    uses h(V); after `harden()` rounding is floor(W/s) + 1[V >= 0]."""

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor):
        super().__init__()
        if not bool(base.initialized):
            raise RuntimeError("AdaRound needs a calibrated weight quantizer")
        self.bits, self.ch_axis = base.bits, base.ch_axis
        self.register_buffer("scale", broadcast_to_channel(base.scale.detach().clone(), weight, base.ch_axis))
        self.register_buffer("zero_point", broadcast_to_channel(base.zero_point.detach().clone(), weight,
                                                                base.ch_axis))
        w = weight.detach()
        frac = w / self.scale - torch.floor(w / self.scale)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding(self) -> torch.Tensor:
        return self.h() if self.soft else (self.alpha >= 0).to(self.alpha.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.floor(w / self.scale) + self.rounding() + self.zero_point, 0, qmax(self.bits))
        return (q - self.zero_point) * self.scale

    def harden(self) -> None:
        self.soft = False
