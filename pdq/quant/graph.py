"""Turn a float CNN into a fake-quantized `torch.fx.GraphModule` (spec §2.1-§2.2).

1. trace with torch.fx (the model's own forward, functional pooling/flatten included);
2. fold every BatchNorm into the conv/linear before it;
3. swap Conv2d/Linear for QuantConv2d/QuantLinear (per-channel weight quantizers);
4. insert per-tensor activation quantizers at layer and block *outputs*:
   - after a conv/linear (after its activation when that is its only user), unless the value only
     feeds residual `add`s (last conv of a residual branch, projection shortcut);
   - after every residual `add` (after its activation, e.g. ResNet's ReLU);
   - never on the network output (logits).
An activation quantizer is registered next to what it quantizes: `<layer>.aq` for a layer output,
`<block>.aq` for a block (residual sum) output. No model-name checks: any traceable CNN works.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from pdq.errors import PdqError
from pdq.quant.fold import _set_submodule, fold_bn
from pdq.quant.modules import FLOAT_TO_QUANT, QUANT_LAYERS
from pdq.quant.quantizers import ActQuantizer

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh, nn.Mish)
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.silu, F.gelu, F.leaky_relu, F.hardtanh,
                        F.mish}
ACTIVATION_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}


def _module(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_activation(gm: nn.Module, node: fx.Node) -> bool:
    return ((node.op == "call_module" and isinstance(_module(gm, node), ACTIVATION_MODULES))
            or (node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS)
            or (node.op == "call_method" and node.target in ACTIVATION_METHODS))


def is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))


def is_quant_layer(gm: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(_module(gm, node), QUANT_LAYERS)


def is_act_quant(gm: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(_module(gm, node), ActQuantizer)


def _owner(node: fx.Node) -> str:
    """Innermost module path a functional node was traced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _output_point(gm: nn.Module, node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) == 1 and is_activation(gm, users[0]):
        return users[0]
    return node


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise PdqError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); pdq needs a model whose forward has no "
                       f"data-dependent control flow") from None


def quantize_model(model: nn.Module, bits: int = 8) -> fx.GraphModule:
    """A BN-folded, fake-quantized copy of `model` (the float model is left untouched). All quantizers
    start at `bits` and uncalibrated; `pdq.quant.layout.apply_layout` sets the real bit widths. The copy's
    parameters need no gradient: what reconstruction learns are parameters of its own (AdaRound, LSQ)."""
    gm = trace(copy.deepcopy(model).eval().requires_grad_(False))
    fold_bn(gm)
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if mod is not None and type(mod) in FLOAT_TO_QUANT:
            _set_submodule(gm, node.target, FLOAT_TO_QUANT[type(mod)].from_float(mod, bits))
    taken = {name for name, _ in gm.named_modules()}
    for node in list(gm.graph.nodes):
        if is_quant_layer(gm, node):
            point, owner = _output_point(gm, node), node.target
        elif is_add(node):
            point, owner = _output_point(gm, node), _owner(node)
        else:
            continue
        if any(u.op == "output" for u in point.users):
            continue  # logits stay in full precision
        if is_quant_layer(gm, node) and all(is_add(u) for u in point.users):
            continue  # residual-branch end or shortcut: the block output quantizer covers it
        name = _free_name(f"{owner}.aq" if owner else "aq", taken)
        taken.add(name)
        gm.add_submodule(name, ActQuantizer(bits))
        with gm.graph.inserting_after(point):
            q = gm.graph.call_module(name, (point,))
        point.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    gm.graph.lint()
    gm.recompile()
    if not quant_layer_names(gm):
        raise PdqError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    return gm


def _free_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def quant_layer_names(gm: fx.GraphModule) -> list[str]:
    """Quantized conv/linear layers in forward (graph) order."""
    return [n.target for n in gm.graph.nodes if is_quant_layer(gm, n)]


def act_quant_names(gm: fx.GraphModule) -> list[str]:
    """Activation quantizers in forward (graph) order."""
    return [n.target for n in gm.graph.nodes if is_act_quant(gm, n)]


def stem_and_head(gm: fx.GraphModule) -> tuple[str, str | None, str, str | None]:
    """(first layer, its output quantizer, last layer, the quantizer feeding it through pooling/flatten)."""
    layers = [n for n in gm.graph.nodes if is_quant_layer(gm, n)]
    first, last = layers[0], layers[-1]
    first_out = next((u.target for u in _output_point(gm, first).users if is_act_quant(gm, u)), None)
    node, last_in = last.args[0], None
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if is_act_quant(gm, node):
            last_in = node.target
            break
        if is_quant_layer(gm, node) or is_add(node):
            break
        node = node.args[0] if node.args else None
    return first.target, first_out, last.target, last_in
