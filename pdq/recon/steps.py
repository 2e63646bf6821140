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
    quantizers = [m for m in g.modules() if isinstance(m, FakeQuantizer)]
    for q in quantizers:
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
    """Integer steps per unit, summing to round(budget * iters * units): proportional to `sensitivity`, each within
    [bounds[0] * iters, bounds[1] * iters] (at least 1), the remainder after rounding down going to the largest
    fractional parts. `budget` must lie within `bounds` (`Phase` checks it)."""
    n = len(sensitivity)
    if n == 0:
        return []
    total = round(budget * iters * n)
    lo, hi = max(1.0, bounds[0] * iters), max(1.0, bounds[1] * iters)
    total = min(max(total, math.ceil(lo * n)), math.floor(hi * n))
    s = [max(float(v), 0.0) for v in sensitivity]
    if sum(s) <= 0:  # nothing measurable: uniform
        s = [1.0] * n

    def spend(c: float) -> list[float]:
        return [min(max(c * v, lo), hi) for v in s]

    top = 1.0
    while sum(spend(top)) < total:  # sum(spend(c)) grows with c, from n * lo to n * hi
        top *= 2
    bottom = 0.0
    for _ in range(200):
        mid = (bottom + top) / 2
        bottom, top = (mid, top) if sum(spend(mid)) < total else (bottom, mid)
    real = spend(top)
    steps = [math.floor(x) for x in real]
    order = sorted(range(n), key=lambda i: (steps[i] - real[i], i))  # largest fractional part first
    for i in order[: total - sum(steps)]:
        steps[i] += 1
    return steps
