"""Per-layer sensitivity: the prediction-difference (PD) loss of the network with one quantizer at one width.

For each quantized layer and candidate weight width (and optionally each activation quantizer and candidate
activation width), only that quantizer is on, at that width, with round-to-nearest and the scales of its
observer (rtn_mse's Lp search); everything else is in full precision. The loss is PD-Quant's
KL(softmax(z_fp / T) || softmax(z_q / T)) over the calibration set (`pdq.recon.losses.prediction_difference`),
against FP logits computed once. A quantizer at 32 bits is off, so its sensitivity is exactly 0.

`measure_cached` keeps a table under `paths.cache_dir`, so that the jobs of a budget sweep measure once per model
and calibration set."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import fx

from pdq.cache import entry
from pdq.distributed import compute_tag
from pdq.mixed.allocate import BUDGETS, IMAGE_BITS, LayerCost, spent
from pdq.quant.graph import act_quant_names, is_act_quant, is_quant_layer, quant_layer_names
from pdq.quant.observers import Observer
from pdq.quant.quantizers import FP_BITS, FakeQuantizer
from pdq.quant.state import full_precision
from pdq.recon.losses import batched_logits, pd_loss

log = logging.getLogger("pdq")


@torch.no_grad()
def measure(gm: fx.GraphModule, images: torch.Tensor, *, weight_bits: list[int], weight_observer: Observer,
            act_bits: list[int] = (), act_observer: Observer | None = None, temperature: float = 1.0,
            batch_size: int = 256, act_init_size: int = 256,
            skip: set[str] = frozenset()) -> dict[str, dict[str, dict[int, float]]]:
    """{"weights": {layer: {bits: PD loss}}, "acts": {quantizer: {bits: PD loss}}} of the quantized graph `gm`
    (left as it is: the measurement works on a copy) on `images`, for every layer not in `skip`."""
    layers = [n for n in quant_layer_names(gm) if n not in skip]
    log.info("sensitivity: measuring %d layers at %s weight bits%s on %d images", len(layers), list(weight_bits),
             f" and {len(act_quant_names(gm))} activation quantizers at {list(act_bits)} bits" if act_bits else "",
             len(images))
    g = copy.deepcopy(gm).eval()
    for q in g.modules():
        if isinstance(q, FakeQuantizer):
            q.enabled = False
    fp = batched_logits(g, images, batch_size)
    table = {"weights": {}, "acts": {}}
    for name in layers:
        layer = g.get_submodule(name)
        wq, row = layer.weight_quant, {}
        for bits in weight_bits:
            wq.bits, wq.enabled = bits, True
            if bits < FP_BITS:
                wq.observe(layer.weight, weight_observer)
            row[bits] = pd_loss(g, images, fp, batch_size, temperature)
        wq.enabled = False
        table["weights"][name] = row
    for name in act_quant_names(g) if act_bits else []:
        aq, row = g.get_submodule(name), {}
        for bits in act_bits:
            aq.bits, aq.enabled = bits, True
            if bits < FP_BITS:
                aq.calibrate_with = act_observer
                g(images[:act_init_size])
            row[bits] = pd_loss(g, images, fp, batch_size, temperature)
        aq.enabled = False
        table["acts"][name] = row
    return table


def measure_cached(cache_dir: str | Path | None, gm: fx.GraphModule, images: torch.Tensor,
                   **settings) -> dict[str, dict[str, dict[int, float]]]:
    """`measure(gm, images, **settings)`, kept in the cache's `sensitivity` namespace under `cache_dir`
    (`pdq.cache`; no cache: None). The key covers everything the table depends on: the graph's weights and
    buffers, the images, every setting (observers by their class and fields), the device or thread count and
    the torch version. An entry that does not load or does not fit is measured again and overwritten."""
    if not cache_dir:
        return measure(gm, images, **settings)
    found = entry(cache_dir, "sensitivity", {"graph": gm, "images": images, "settings": settings,
                                             "compute": compute_tag(images.device)}, images.device)

    def check(raw):
        table = {kind: {name: {int(b): float(v) for b, v in row.items()} for name, row in raw[kind].items()}
                 for kind in ("weights", "acts")}
        for kind, bits in (("weights", settings["weight_bits"]), ("acts", settings.get("act_bits", ()))):
            if any(sorted(row) != sorted(bits) for row in table[kind].values()):
                raise ValueError(f"its {kind} rows are not at the widths {sorted(bits)}")
        return table

    table = found.load(check)
    if table is not None:
        log.info("sensitivity: cached in %s", found)
        return table
    table = measure(gm, images, **settings)
    found.save({kind: {name: {str(b): v for b, v in row.items()} for name, row in table[kind].items()}
                for kind in ("weights", "acts")})
    return table


def _input_bits(gm: fx.GraphModule, node: fx.Node, act_bits: dict[str, int]) -> int:
    """The bits of the activation quantizer that feeds a layer (through pooling, flatten, ...)."""
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_act_quant(gm, node):
            return act_bits.get(node.target, FP_BITS)
        if is_quant_layer(gm, node) or not node.args:
            return FP_BITS
        node = node.args[0]
    return IMAGE_BITS


@torch.no_grad()
def layer_costs(gm: fx.GraphModule, image: torch.Tensor, act_bits: dict[str, int]) -> dict[str, LayerCost]:
    """Weight count, MACs per image and input bits of every quantized layer (one forward of one image)."""
    macs, hooks = {}, []
    for name in quant_layer_names(gm):
        layer = gm.get_submodule(name)
        per_output = layer.weight[0].numel()  # in_channels / groups x kernel size, or in_features

        def hook(module, args, out, name=name, per_output=per_output):
            macs[name] = out[0].numel() * per_output

        hooks.append(layer.register_forward_hook(hook))
    try:
        with full_precision(gm):
            gm(image[:1])
    finally:
        for h in hooks:
            h.remove()
    nodes = {n.target: n for n in gm.graph.nodes if is_quant_layer(gm, n)}
    return {name: LayerCost(numel=gm.get_submodule(name).weight.numel(), macs=int(macs[name]),
                            in_bits=_input_bits(gm, nodes[name].args[0], act_bits)) for name in nodes}


def model_cost(gm: fx.GraphModule, image: torch.Tensor, table: dict[str, dict[str, int]]) -> dict[str, float]:
    """What the bit layout `table` costs under every budget kind (avg_w_bits, size_mib, bops), for the report."""
    costs = layer_costs(gm, image, table["acts"])
    return {key: spent(table["weights"], costs, key) for key in BUDGETS}
