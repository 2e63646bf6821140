"""How many steps each unit of a phase gets (`method.steps`, `method.step_budget`).

A phase spends `step_budget` x `iters` x (units fitted) steps in all (1.0: `iters` per unit, the papers').
* `uniform`: every unit the same share, round(step_budget x iters) steps.
* `adaptive`: a per-unit share from a measured sensitivity. A unit's sensitivity is the PD loss
  (`pdq.recon.losses.pd_loss`) of the network with only that unit quantized: its weights rounded to nearest with
  their searched scales and, when the phase quantizes activations, its activation quantizers initialised by the
  method's observer; everything else in full precision. Each unit gets steps in proportion to it, clipped to
  `step_bounds` x `iters` (the clipped share goes to the others).
The plan is made before a phase's first unit, because AdaRound's regulariser warm-up and beta schedule and the
scales' LR schedule span a unit's own steps. A unit fitted for n steps has its learning rates multiplied by
iters / n (`Phase.with_steps`): Adam moves a variable about lr per step, so each variable can move as far as with
`iters` steps. At the embedded budget that distance, not the number of gradient samples, is what the steps buy
(docs/results.md, "Steps where they matter").
"""

from __future__ import annotations

import copy
import math

import torch
from torch import fx

from pdq.quant.observers import Observer
from pdq.quant.quantizers import FakeQuantizer
from pdq.quant.state import calibrate_activations
from pdq.recon.losses import batched_logits, pd_loss
from pdq.recon.units import Unit


@torch.no_grad()
def unit_sensitivity(gm: fx.GraphModule, units: list[Unit], images: torch.Tensor, *, act_quant: bool,
                     act_observer: Observer, batch_size: int, temperature: float) -> list[float]:
    """The PD loss of `gm` (left as it is: the measurement works on a copy) with only each unit quantized."""
    g = copy.deepcopy(gm).eval()
    for q in g.modules():
        if isinstance(q, FakeQuantizer):
            q.enabled = False
    fp = batched_logits(g, images, batch_size)
    out = []
    for unit in units:
        mine = [g.get_submodule(n).weight_quant for n in unit.layers(g)]
        mine += [g.get_submodule(n) for n in unit.act_quants(g)] if act_quant else []
        for q in mine:
            q.enabled = True
        calibrate_activations(g, images, act_observer, only_uninitialized=True)
        out.append(pd_loss(g, images, fp, batch_size, temperature))
        for q in mine:
            q.enabled = False
    return out


def allocate_steps(sensitivity: list[float], iters: int, budget: float, bounds: tuple[float, float]) -> list[int]:
    """Integer steps per unit, summing to round(budget * iters * units) (within what the bounds allow):
    proportional to `sensitivity`, each within [ceil(bounds[0] * iters), floor(bounds[1] * iters)] and at least 1,
    the remainder after rounding down going to the largest fractional parts. A unit whose sensitivity is 0 (or not
    finite) gets the fewest steps unless the others cannot take the budget; all 0: equal shares."""
    n = len(sensitivity)
    if n == 0:
        return []
    lo = max(1, math.ceil(bounds[0] * iters))
    hi = max(lo, math.floor(bounds[1] * iters))
    total = min(max(round(budget * iters * n), lo * n), hi * n)
    s = [float(v) if math.isfinite(v) and v > 0 else 0.0 for v in sensitivity]
    positive = [v for v in s if v > 0]
    # a zero takes steps only after every positive unit is at `hi` (all zero: equal shares)
    s = [v if v > 0 else (min(positive) * 1e-9 if positive else 1.0) for v in s]

    def spend(c: float) -> list[float]:
        return [min(max(c * v, lo), hi) for v in s]

    bottom, top = 0.0, hi / min(s)  # at `top` every unit is at `hi`
    for _ in range(200):
        mid = (bottom + top) / 2
        bottom, top = (mid, top) if sum(spend(mid)) < total else (bottom, mid)
    real = spend(top)
    steps = [math.floor(x) for x in real]
    short = total - sum(steps)
    for i in sorted((i for i in range(n) if steps[i] < hi), key=lambda i: (steps[i] - real[i], i))[:short]:
        steps[i] += 1
    return steps
