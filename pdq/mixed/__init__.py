"""Mixed precision: per-layer PD sensitivity (sensitivity), exact bit allocation under a budget (allocate), and
the `quant=mixed` layout that runs both before the method (layout)."""

from pdq.mixed.allocate import BUDGETS, LayerCost, allocate
from pdq.mixed.layout import MixedLayout
from pdq.mixed.sensitivity import layer_costs, measure

__all__ = ["BUDGETS", "LayerCost", "MixedLayout", "allocate", "layer_costs", "measure"]
