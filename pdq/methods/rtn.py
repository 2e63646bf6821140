"""Round-to-nearest PTQ: scales from calibration statistics, no reconstruction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from pdq.quant.observers import Observer
from pdq.quant.state import calibrate_activations, calibrate_weights


@dataclass
class QuantContext:
    """What every method gets besides the model and calibration images."""
    device: torch.device
    batch_size: int = 32
    act_init_size: int = 256
    seed: int = 0


class RoundToNearest:
    iters = 0

    def __init__(self, name: str, weight_observer: Observer, act_observer: Observer):
        self.name, self.weight_observer, self.act_observer = name, weight_observer, act_observer

    def quantize(self, qmodel: fx.GraphModule, calib: torch.Tensor, ctx: QuantContext) -> list[dict]:
        calibrate_weights(qmodel, self.weight_observer)
        calibrate_activations(qmodel, calib[: ctx.act_init_size].to(ctx.device), self.act_observer)
        return []
