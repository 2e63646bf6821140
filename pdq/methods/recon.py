"""Reconstruction methods (AdaRound, BRECQ, QDrop; PD-Quant adds its terms on top): one engine,
configured by a list of phases."""

from __future__ import annotations

import torch
from torch import fx

from pdq.context import RunContext
from pdq.quant.observers import Observer
from pdq.quant.state import act_quantizers, calibrate_activations, calibrate_weights
from pdq.recon.engine import Phase, ReconstructionEngine


class Reconstruction:
    def __init__(self, name: str, phases: list, weight_observer: Observer, act_observer: Observer, **hparams):
        """`hparams`: the flat keys of the method config (iters, round_weight, drop_prob, ...) that its
        phases interpolate; kept for the record."""
        self.name, self.hparams = name, hparams
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        self.weight_observer, self.act_observer = weight_observer, act_observer

    @property
    def iters(self) -> int:
        return max(p.iters for p in self.phases)

    def quantize(self, qmodel: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> list[dict]:
        if ctx.resume_state is not None:  # the saved state holds the weight scales: no second search
            qmodel.load_state_dict(ctx.resume_state["state_dict"])
        else:
            ctx.dist.broadcast_quantizers(calibrate_weights(qmodel, self.weight_observer))
        units = ReconstructionEngine(qmodel, calib, ctx, self.act_observer).run(self.phases)
        for q in act_quantizers(qmodel):  # e.g. AdaRound: activations are quantized after the weights
            q.enabled = True
        ctx.dist.broadcast_quantizers(calibrate_activations(qmodel, calib[: ctx.act_init_size].to(ctx.device),
                                                            self.act_observer, only_uninitialized=True))
        return units
