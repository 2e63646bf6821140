"""`quant=mixed`: a bit layout whose per-layer weight widths are chosen from the PD sensitivity under a budget.

`prepare` measures the sensitivity of every free layer (the stem and the classifier keep their `quant.layout`
widths, and so does every layer named in `quant.per_layer`), allocates the widths exactly (`pdq.mixed.allocate`)
and returns the layout with those widths in `per_layer`, which the run's method quantizes with, and the files
for the run dir: the table, its heat-map and the allocation. The allocation reproduces the run when passed
back as `quant.per_layer`."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import fx

from pdq.checks import check_float, check_int
from pdq.errors import PdqError
from pdq.figures import figure, png
from pdq.mixed.allocate import BUDGETS, allocate, spent
from pdq.mixed.sensitivity import layer_costs, measure_cached
from pdq.quant.graph import stem_and_head
from pdq.quant.label import bit_setting
from pdq.quant.layout import BitLayout
from pdq.quant.observers import Observer
from pdq.quant.quantizers import check_bits

if TYPE_CHECKING:
    from pdq.context import RunContext

log = logging.getLogger("pdq")


@dataclass
class MixedLayout(BitLayout):
    """A `BitLayout` plus what the allocation needs; every value comes from conf/quant/mixed.yaml."""

    candidates: list[int] = field(kw_only=True)
    act_candidates: list[int] = field(kw_only=True)
    budget: dict = field(kw_only=True)
    weight_observer: Observer = field(kw_only=True)
    act_observer: Observer = field(kw_only=True)
    temperature: float = field(kw_only=True)
    batch_size: int = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        for key in ("candidates", "act_candidates"):
            values = list(getattr(self, key))
            for bits in values:
                try:
                    check_bits(bits, f"quant.{key}")
                except ValueError as e:
                    raise PdqError(str(e)) from None
            if key == "candidates" and not values:
                raise PdqError("quant.candidates=[] is not accepted; accepted: one or more widths 2..8 (or 32)")
            setattr(self, key, sorted(set(values)))
        unknown = sorted(set(self.budget) - set(BUDGETS))
        if unknown:
            raise PdqError(f"quant.budget.{unknown[0]} is unknown; accepted: {', '.join(BUDGETS)}")
        given = {k: v for k, v in self.budget.items() if v is not None}
        if len(given) > 1:
            raise PdqError(f"quant.budget sets {', '.join(given)}; accepted: one of {', '.join(BUDGETS)}")
        for key, value in given.items():
            check_float(f"quant.budget.{key}", value, 0, lo_open=True)
        self.budget_key, self.budget_value = next(iter(given.items()), (None, None))
        check_float("quant.temperature", self.temperature, 0, lo_open=True)
        check_int("quant.batch_size", self.batch_size, 1)

    @property
    def label(self) -> str:
        """The bit setting in logs, as the report's column: `mixed avg_w_bits=3 A4` (w_bits is not the width)."""
        return bit_setting(self.w_bits, self.a_bits, {self.budget_key: self.budget_value} if self.budget_key else {})

    def check_run(self) -> None:
        """A run allocates, so it needs a budget (`pdq sensitivity` may measure without one)."""
        if self.budget_key is None:
            accepted = ", ".join(f"quant.budget.{key}=" for key in BUDGETS)
            raise PdqError(f"quant=mixed needs a budget; accepted: one of {accepted} (e.g. quant.budget.avg_w_bits=3)")

    def fixed(self, gm: fx.GraphModule) -> dict[str, int]:
        """The layers whose width is not allocated: the stem and the classifier (quant.layout), and per_layer's."""
        first, _, last, _ = stem_and_head(gm)
        table = self.resolve(gm)["weights"]
        return {name: table[name] for name in {first, last, *self.per_layer} if name in table}

    def sensitivity(self, gm: fx.GraphModule, images: torch.Tensor, cache_dir: str | Path | None = None) -> dict:
        """The sensitivity table of every layer but the fixed ones (`measure_cached` with this layout's settings)."""
        return measure_cached(cache_dir, gm, images, weight_bits=self.candidates, weight_observer=self.weight_observer,
                              act_bits=self.act_candidates, act_observer=self.act_observer,
                              temperature=self.temperature, batch_size=self.batch_size, skip=set(self.fixed(gm)))

    def allocate(self, gm: fx.GraphModule, images: torch.Tensor, cache_dir: str | Path | None = None,
                 settings: dict | None = None) -> tuple[MixedLayout, dict]:
        """Measure (or read the table from `cache_dir`) and allocate (module docstring): the layout with the
        allocated widths in `per_layer`, and the files for the run dir (`settings`, what the images are, go into
        sensitivity.json with the temperature)."""
        self.check_run()
        fixed = self.fixed(gm)
        table = self.sensitivity(gm, images, cache_dir)
        costs = layer_costs(gm, images[:1], self.resolve(gm)["acts"])
        sensitivity = table["weights"]
        widths = allocate({**sensitivity, **{n: {b: 0.0} for n, b in fixed.items()}}, costs, self.budget_key,
                          self.budget_value, fixed)
        chosen = dataclasses.replace(self, per_layer={**self.per_layer, **{
            name: bits for name, bits in widths.items() if name not in fixed}})
        allocation = {"budget": {self.budget_key: self.budget_value},
                      "spent": {key: spent(widths, costs, key) for key in BUDGETS},
                      "summed_sensitivity": sum(sensitivity[n][widths[n]] for n in sensitivity),
                      "widths": widths, "per_layer": [f"{n}:{b}" for n, b in chosen.per_layer.items()]}
        log.info("quant=mixed under %s=%s: %s", self.budget_key, self.budget_value,
                 " ".join(f"{n}:{b}" for n, b in widths.items()))
        log.info("pass it back as: quant.per_layer=[%s]", ",".join(allocation["per_layer"]))
        files = sensitivity_files(table, costs, fixed, {"temperature": self.temperature, **(settings or {})})
        return chosen, {**files, "allocation.json": allocation}

    def prepare(self, gm: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> tuple[MixedLayout, dict]:
        """`BitLayout.prepare`: the allocated layout; results.json records the budget."""
        chosen, files = self.allocate(gm, calib.to(ctx.device), ctx.cache_dir,
                                      {"calib_size": len(calib), "seed": ctx.seed})
        return chosen, {"results": {"mixed": {"budget": {self.budget_key: self.budget_value}}}, "files": files}


def sensitivity_files(table: dict, costs: dict, fixed: dict[str, int] | None = None,
                      settings: dict | None = None) -> dict:
    """sensitivity.json (with the `settings` it was measured with), sensitivity.csv and the heat-map
    sensitivity.png (layers x bits), by name."""
    fixed = fixed or {}
    rows = [{"kind": kind, "name": name, "bits": bits, "pd_loss": loss,
             **({"numel": costs[name].numel, "macs": costs[name].macs} if kind == "weights" else {})}
            for kind in ("weights", "acts") for name, row in table[kind].items() for bits, loss in row.items()]
    text = io.StringIO()
    writer = csv.DictWriter(text, ["kind", "name", "bits", "pd_loss", "numel", "macs"])
    writer.writeheader()
    writer.writerows(rows)
    return {"sensitivity.json": {"settings": settings or {}, "fixed": fixed, **{
                kind: {name: {str(b): v for b, v in row.items()} for name, row in table[kind].items()}
                for kind in ("weights", "acts")}},
            "sensitivity.csv": text.getvalue(), "sensitivity.png": heat_map(table["weights"])}


def heat_map(weights: dict[str, dict[int, float]]) -> bytes:
    """The PD loss of each layer (rows) at each width (columns), on a log colour scale, as PNG bytes."""
    from matplotlib.colors import LogNorm

    names = list(weights)
    bits = sorted({b for row in weights.values() for b in row})
    values = [[max(weights[n].get(b, math.nan), 1e-12) for b in bits] for n in names]
    fig, axes = figure(1, 1, 2 + 0.8 * len(bits), 1 + 0.22 * len(names))
    ax = axes[0][0]
    image = ax.imshow(values, aspect="auto", cmap="viridis", norm=LogNorm())
    ax.set_xticks(range(len(bits)), [f"W{b}" for b in bits])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("PD loss, only this layer quantized")
    fig.colorbar(image, ax=ax)
    return png(fig)
