"""State switches over a quantized model, and observer-based calibration."""

from __future__ import annotations

import torch
from torch import fx
from tqdm.auto import tqdm

from pdq.quant.graph import act_quant_names, quant_layer_names
from pdq.quant.observers import Observer
from pdq.quant.quantizers import ActQuantizer, FakeQuantizer


def weight_quantizers(gm: fx.GraphModule) -> list[FakeQuantizer]:
    return [gm.get_submodule(n).weight_quant for n in quant_layer_names(gm)]


def act_quantizers(gm: fx.GraphModule) -> list[ActQuantizer]:
    return [gm.get_submodule(n) for n in act_quant_names(gm)]


def set_quant_state(gm: fx.GraphModule, weight: bool = True, act: bool = True) -> None:
    for q in weight_quantizers(gm):
        q.enabled = weight
    for q in act_quantizers(gm):
        q.enabled = act


def calibrate_weights(gm: fx.GraphModule, observer: Observer) -> None:
    for name in tqdm(quant_layer_names(gm), desc="weight scales", leave=False, dynamic_ncols=True):
        layer = gm.get_submodule(name)
        layer.weight_quant.observe(layer.weight, observer)


@torch.no_grad()
def calibrate_activations(gm: fx.GraphModule, x: torch.Tensor, observer: Observer) -> None:
    """One forward of `x` (one batch, e.g. 256 calibration images) with weights quantized: each
    activation quantizer fits itself to its input in forward order, then quantizes it."""
    set_quant_state(gm, weight=True, act=True)
    for q in act_quantizers(gm):
        q.calibrate_with = observer
    try:
        gm(x)
    finally:
        for q in act_quantizers(gm):
            q.calibrate_with = None
