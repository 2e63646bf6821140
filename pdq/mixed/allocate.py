"""Exact per-layer bit allocation: one width per layer minimising the summed sensitivity under a budget.

An integer linear program solved by `scipy.optimize.milp` (HiGHS, with a zero optimality gap): a binary x[l, b]
per free layer l and candidate width b, sum_b x[l, b] = 1 for each layer, sum cost[l, b] x[l, b] <= budget minus
the fixed layers' cost, minimise sum sensitivity[l, b] x[l, b].

Budgets (one at a time):
* `avg_w_bits`: the average weight width over every quantized layer's weights, fixed layers included;
* `size_mib`: MiB of weight codes (numel x bits / 8), fixed layers included;
* `bops`: bit operations, sum over layers of MACs x weight bits x the bits of the layer's input (an input
  without an activation quantizer, such as the image, counts as 8 bits), fixed layers included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdq.errors import PdqError

BUDGETS = ("avg_w_bits", "size_mib", "bops")
#: the bits an input without an activation quantizer (the image) counts for in BOPs
IMAGE_BITS = 8


@dataclass(frozen=True)
class LayerCost:
    """What a layer's width costs: its weight count, its MACs per image and the bits of its input."""

    numel: int
    macs: int
    in_bits: int


def unit_cost(budget: str, layer: LayerCost) -> float:
    """The cost of one weight bit of `layer` under `budget` (costs are linear in the width)."""
    if budget == "avg_w_bits":
        return float(layer.numel)
    if budget == "size_mib":
        return layer.numel / 8 / 2 ** 20
    return float(layer.macs * layer.in_bits)


def budget_total(budget: str, value: float, costs: dict[str, LayerCost]) -> float:
    """The budget in cost units (avg_w_bits: bits times the total weight count)."""
    return value * sum(c.numel for c in costs.values()) if budget == "avg_w_bits" else value


def allocate(sensitivity: dict[str, dict[int, float]], costs: dict[str, LayerCost], budget: str, value: float,
             fixed: dict[str, int] | None = None) -> dict[str, int]:
    """{layer: bits} for every layer of `sensitivity` (its candidate widths; `fixed` layers keep theirs) that
    minimises the summed sensitivity with the total cost within `value` of `budget`."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if budget not in BUDGETS:
        raise PdqError(f"quant.budget.{budget} is unknown; accepted: {', '.join(BUDGETS)}")
    fixed = dict(fixed or {})
    free = [name for name in sensitivity if name not in fixed]
    options = [(name, bits) for name in free for bits in sorted(sensitivity[name])]
    total = budget_total(budget, value, costs)
    fixed_cost = sum(unit_cost(budget, costs[name]) * bits for name, bits in fixed.items())
    smallest = fixed_cost + sum(unit_cost(budget, costs[name]) * min(sensitivity[name]) for name in free)
    if smallest > total * (1 + 1e-12):
        least = smallest / sum(c.numel for c in costs.values()) if budget == "avg_w_bits" else smallest
        raise PdqError(f"quant.budget.{budget}={value} cannot be met: the smallest feasible budget is {least:.6g} "
                       f"(every free layer at its narrowest candidate, the fixed layers as they are); accepted: "
                       f"quant.budget.{budget} >= {least:.6g}")
    if not free:
        return fixed
    c = np.array([sensitivity[name][bits] for name, bits in options], dtype=np.float64)
    one_each = np.array([[1.0 if name == layer else 0.0 for name, _ in options] for layer in free])
    cost_row = np.array([[unit_cost(budget, costs[name]) * bits for name, bits in options]])
    scale = max(float(cost_row.max()), 1e-300)  # one cost row of order 1 for the solver's tolerances
    result = milp(c, integrality=np.ones(len(options)), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_each, 1, 1),
                               LinearConstraint(cost_row / scale, -np.inf, (total - fixed_cost) / scale)],
                  options={"mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        raise PdqError(f"the allocation under quant.budget.{budget}={value} found no solution ({result.message})")
    chosen = {name: bits for (name, bits), x in zip(options, result.x, strict=True) if x > 0.5}
    return {name: fixed.get(name, chosen.get(name)) for name in sensitivity}


def spent(allocation: dict[str, int], costs: dict[str, LayerCost], budget: str) -> float:
    """What `allocation` costs, in the budget's own unit."""
    total = sum(unit_cost(budget, costs[name]) * bits for name, bits in allocation.items())
    return total / sum(c.numel for c in costs.values()) if budget == "avg_w_bits" else total
