"""State switches over a quantized model (or any piece of it), and observer-based calibration."""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from pdq.distributed import progress_disabled
from pdq.quant.graph import quant_layer_names
from pdq.quant.observers import Observer
from pdq.quant.quantizers import ActQuantizer, FakeQuantizer


def weight_quantizers(gm: fx.GraphModule) -> list[FakeQuantizer]:
    return [gm.get_submodule(n).weight_quant for n in quant_layer_names(gm)]


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    """Activation quantizers of `module` (a whole quantized model or a piece of it)."""
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


def set_quant_state(gm: fx.GraphModule, weight: bool = True, act: bool = True) -> None:
    for q in weight_quantizers(gm):
        q.enabled = weight
    for q in act_quantizers(gm):
        q.enabled = act


@contextlib.contextmanager
def full_precision(module: nn.Module):
    """Every quantizer of `module` off inside the block; the previous switches are restored after."""
    saved = [(q, q.enabled) for q in module.modules() if isinstance(q, FakeQuantizer)]
    for q, _ in saved:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in saved:
            q.enabled = enabled


def calibrate_weights(gm: fx.GraphModule, observer: Observer) -> list[FakeQuantizer]:
    """Every weight quantizer fitted to its weight; returns them."""
    for name in tqdm(quant_layer_names(gm), desc="weight scales", leave=False, dynamic_ncols=True,
                     disable=progress_disabled()):
        layer = gm.get_submodule(name)
        layer.weight_quant.observe(layer.weight, observer)
    return weight_quantizers(gm)


@torch.no_grad()
def calibrate_activations(module: nn.Module, x: torch.Tensor, observer: Observer,
                          only_uninitialized: bool = False) -> list[ActQuantizer]:
    """One forward of `x` (one batch, e.g. 256 calibration images): each enabled activation quantizer
    (or each one not calibrated yet) fits itself to its input in forward order, then quantizes it.
    Returns the quantizers it fitted."""
    pending = [q for q in act_quantizers(module)
               if q.active and not (only_uninitialized and bool(q.initialized))]
    if not pending:
        return []
    for q in pending:
        q.calibrate_with = observer
    try:
        module(x)
    finally:
        for q in pending:
            q.calibrate_with = None
    return pending
