"""State switches over a quantized model (or any piece of it), each a context manager that sets on entry
and restores on exit (`full_precision`, `adaround`, `learned_scales`, `dropping`), and observer-based
calibration."""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from pdq.distributed import SINGLE, Dist
from pdq.errors import PdqError
from pdq.quant.adaround import AdaRoundQuantizer
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


@contextlib.contextmanager
def adaround(layers: list[nn.Module], learn_scale: bool = False, names: list[str] | None = None):
    """AdaRound variables for the weights of `layers` (those whose weight quantizer is active), with learned
    weight scales when `learn_scale` (Genie-M); yields their `AdaRoundQuantizer`s. On exit every layer gets its
    quantizer back, the rounding is hardened and written into the weights (hard-rounded grid values), and a
    learned scale becomes that quantizer's scale (on which grid the weights then lie: the quantizer is idempotent
    on them). Learned scales that are not positive are then one error naming the layers (`names`), unless the
    block is already ending with an error."""
    bases = [layer.weight_quant for layer in layers]
    for layer in layers:
        if layer.weight_quant.active:
            layer.weight_quant = AdaRoundQuantizer(layer.weight_quant, layer.weight, learn_scale)
    failed = True
    try:
        yield [layer.weight_quant for layer in layers if isinstance(layer.weight_quant, AdaRoundQuantizer)]
        failed = False
    finally:
        bad = []
        for k, (layer, base) in enumerate(zip(layers, bases)):
            ada = layer.weight_quant
            layer.weight_quant = base
            if not isinstance(ada, AdaRoundQuantizer):
                continue
            ada.harden()
            with torch.no_grad():
                layer.weight.copy_(ada(layer.weight))
            if not ada.learns_scale:
                continue
            if bool((ada.scale > 0).all()):
                base.set_qparams(ada.scale.detach(), base.zero_point)
            else:
                name = names[k] if names else f"{type(layer).__name__} with weight {list(layer.weight.shape)}"
                bad.append(f"{name} ({ada.scale.min().item():.3g})")
        if bad and not failed:
            raise PdqError(f"learned weight scales reached 0 or below in {', '.join(bad)}; accepted: scales > 0 "
                           "(lower method.weight_scale_lr)")


@contextlib.contextmanager
def learned_scales(quantizers: list[ActQuantizer]):
    """LSQ: the scales of the active `quantizers` become parameters (yielded); buffers again on exit."""
    params = [q.learn_scale() for q in quantizers if q.active]
    try:
        yield params
    finally:
        for q in quantizers:
            q.freeze_scale()


@contextlib.contextmanager
def dropping(quantizers: list[ActQuantizer], prob: float, generator: torch.Generator | None):
    """QDrop: each activation quantizer quantizes an element with probability `prob`, drawn from
    `generator`; the previous settings are restored on exit."""
    saved = [(q.drop_prob, q.generator) for q in quantizers]
    for q in quantizers:
        q.drop_prob, q.generator = prob, generator
    try:
        yield
    finally:
        for q, (p, g) in zip(quantizers, saved):
            q.drop_prob, q.generator = p, g


def calibrate_weights(gm: fx.GraphModule, observer: Observer, dist: Dist = SINGLE) -> list[FakeQuantizer]:
    """Every weight quantizer fitted to its weight; returns them."""
    for name in tqdm(quant_layer_names(gm), desc="weight scales", leave=False, dynamic_ncols=True,
                     disable=dist.progress_disable):
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
