"""Reconstruction methods (AdaRound, BRECQ, QDrop; PD-Quant adds its terms on top): one engine,
configured by a list of phases."""

from __future__ import annotations

import torch
from torch import fx

from pdq.checks import check_int
from pdq.context import RunContext
from pdq.errors import PdqError
from pdq.quant.observers import Observer
from pdq.quant.state import act_quantizers, calibrate_activations, calibrate_weights
from pdq.recon.engine import ReconstructionEngine
from pdq.recon.phase import PHASE_KEYS, Phase
from pdq.recon.units import warn_about

#: method keys that are no phase field: the YAML interpolates them into phases (optimiser learning rates,
#: the steps of BRECQ's activation phase)
KNOBS = ("round_lr", "scale_lr", "weight_scale_lr", "act_iters")


def _reject_unknown(method: str, where: str, keys: dict, accepted: tuple[str, ...]) -> None:
    unknown = [k for k in keys if k not in accepted]
    if unknown:
        raise PdqError(f"{where}.{unknown[0]}={keys[unknown[0]]!r} is not a setting of {method}; accepted: "
                       f"{', '.join(accepted)}")


class Reconstruction:
    def __init__(self, name: str, phases: list, weight_observer: Observer, act_observer: Observer, **settings):
        """`settings`: the method's flat keys (`conf/method/_recon.yaml`). A phase key that a phase does
        not set takes the method's value of the same name; any other key is an error naming it."""
        _reject_unknown(name, "method", settings, (*PHASE_KEYS, *KNOBS))
        for i, phase in enumerate(phases):
            if isinstance(phase, dict):
                _reject_unknown(name, f"method.phases.{i}", phase, PHASE_KEYS)
        if "act_iters" in settings:
            check_int("method.act_iters", settings["act_iters"], 0)
        defaults = {k: v for k, v in settings.items() if k in PHASE_KEYS}
        self.name, self.weight_observer, self.act_observer = name, weight_observer, act_observer
        self.phases = [p if isinstance(p, Phase) else Phase(**{**defaults, **p}) for p in phases]
        if any(p.learn_weight_scale for p in self.phases) and not any(p.learns_weight_scales for p in self.phases):
            raise PdqError("method.learn_weight_scale=true needs a phase with method.learn_rounding=true: the weight "
                           "scales are learned with the rounding variables (Genie-M); accepted: learn_rounding=true, "
                           "or learn_weight_scale=false")

    @property
    def iters(self) -> int:
        return max(p.iters for p in self.phases)

    @property
    def components(self) -> dict[str, bool]:
        """PD-Quant's components this method uses: PD term, reconstruction regulariser, DC."""
        return {"pd": any(p.pd_weight > 0 for p in self.phases), "reg": any(p.rec_weight > 0 for p in self.phases),
                "dc": any(p.dc.enabled for p in self.phases)}

    def unit_table(self, qmodel: fx.GraphModule) -> list[dict]:
        """The units of every pattern (and number of merges) the phases use, one row each (`Unit.row`), the first
        row of each carrying the warnings it earns."""
        rows = []
        for phase in {(p.pattern, p.unit_merges): p for p in self.phases}.values():
            units = phase.units(qmodel)
            label = phase.pattern + (f", {phase.unit_merges} merged" if phase.unit_merges else "")
            mine = [{"pattern": label, **u.row(qmodel)} for u in units]
            mine[0]["warnings"] = warn_about(qmodel, units, phase.pattern)
            rows += mine
        return rows

    def quantize(self, qmodel: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> list[dict]:
        if ctx.resume_state is not None:  # the saved state holds the weight scales: no second search
            qmodel.load_state_dict(ctx.resume_state["state_dict"])
        else:
            ctx.dist.broadcast_quantizers(calibrate_weights(qmodel, self.weight_observer, ctx.dist))
        units = ReconstructionEngine(qmodel, calib, ctx, self.act_observer).run(self.phases)
        for q in act_quantizers(qmodel):  # e.g. AdaRound: activations are quantized after the weights
            q.enabled = True
        ctx.dist.broadcast_quantizers(calibrate_activations(qmodel, calib[: ctx.act_init_size].to(ctx.device),
                                                            self.act_observer, only_uninitialized=True))
        return units
