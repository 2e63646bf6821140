"""Round-to-nearest PTQ: scales from calibration statistics, no reconstruction."""

from __future__ import annotations

import torch
from torch import fx

from pdq.context import RunContext
from pdq.quant.observers import Observer
from pdq.quant.state import calibrate_activations, calibrate_weights, set_quant_state


class RoundToNearest:
    iters = 0

    def __init__(self, name: str, weight_observer: Observer, act_observer: Observer):
        self.name, self.weight_observer, self.act_observer = name, weight_observer, act_observer

    @property
    def components(self) -> dict[str, bool]:
        """None of PD-Quant's components (PD term, reconstruction regulariser, DC)."""
        return {"pd": False, "reg": False, "dc": False}

    def unit_table(self, qmodel: fx.GraphModule) -> list[dict]:
        """No reconstruction units: every quantizer is set from statistics alone."""
        return []

    def quantize(self, qmodel: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> list[dict]:
        fitted = calibrate_weights(qmodel, self.weight_observer, ctx.dist)
        set_quant_state(qmodel, weight=True, act=True)
        fitted += calibrate_activations(qmodel, calib[: ctx.act_init_size].to(ctx.device), self.act_observer)
        ctx.dist.broadcast_quantizers(fitted)  # one observer result on every rank of a DDP run
        return []
