"""Turn a float CNN into a fake-quantized `torch.fx.GraphModule` (spec §2.1-§2.2).

1. trace with torch.fx (the model's own forward, functional pooling/flatten included);
2. fold every BatchNorm into the conv/linear before it;
3. swap Conv2d/Linear for QuantConv2d/QuantLinear (per-channel weight quantizers);
4. insert per-tensor activation quantizers at layer and block *outputs*:
   - after a conv/linear (after its activation when that is its only user), unless the value only
     feeds residual `add`s (last conv of a residual branch, projection shortcut);
   - after every residual `add` (after its activation, e.g. ResNet's ReLU);
   - never on the network output (logits).
   That is the papers' placement (`backend=academic`); a runtime backend (`pdq.quant.backends`) adds the
   quantizers its integer kernels need (`input_aq` on the model input, `<layer>.aq` on convs that feed adds,
   `<layer>_in_aq` before a layer whose input comes from no quantizer, `<block>.res_aq` on an add's residual
   input) and gives every quantizer the backend's grid.
An activation quantizer is registered next to what it quantizes: `<layer>.aq` for a layer output,
`<block>.aq` for a block (residual sum) output. No model-name checks: any traceable CNN works.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from pdq.errors import PdqError
from pdq.quant.backends import Backend, get_backend
from pdq.quant.fold import fold_bn
from pdq.quant.modules import FLOAT_TO_QUANT, QUANT_LAYERS
from pdq.quant.quantizers import ActQuantizer

log = logging.getLogger("pdq")

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh, nn.Mish)
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.silu, F.gelu, F.leaky_relu, F.hardtanh,
                        F.mish}
ACTIVATION_METHODS = {"relu", "relu_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
#: activations a QuantizeLinear with zero point 0 makes redundant (onnxruntime drops them; TensorRT fuses them)
ABSORBED_MODULES = (nn.ReLU, nn.ReLU6)
ABSORBED_FUNCTIONS = {F.relu, torch.relu, F.relu6}
#: ops that move integer codes without changing them: their output keeps their input's grid
PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
PASS_FUNCTIONS = {F.max_pool2d, torch.flatten, F.dropout}
PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}


def _module(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_activation(gm: nn.Module, node: fx.Node) -> bool:
    return ((node.op == "call_module" and isinstance(_module(gm, node), ACTIVATION_MODULES))
            or (node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS)
            or (node.op == "call_method" and node.target in ACTIVATION_METHODS))


def is_absorbed_activation(gm: nn.Module, node: fx.Node) -> bool:
    """ReLU or ReLU6: an activation that a zero-point-0 quantizer right after it makes redundant."""
    return ((node.op == "call_module" and isinstance(_module(gm, node), ABSORBED_MODULES))
            or (node.op == "call_function" and node.target in ABSORBED_FUNCTIONS)
            or (node.op == "call_method" and node.target in ACTIVATION_METHODS))


def is_pass_through(gm: nn.Module, node: fx.Node) -> bool:
    """An op whose output holds its input's integer codes (max pooling, flatten, reshape, dropout in eval)."""
    return ((node.op == "call_module" and isinstance(_module(gm, node), PASS_MODULES))
            or (node.op == "call_function" and node.target in PASS_FUNCTIONS)
            or (node.op == "call_method" and node.target in PASS_METHODS))


def quantizer_before(gm: nn.Module, node: fx.Node) -> fx.Node | None:
    """The activation quantizer whose codes `node` (a value) carries: itself, or the one before the max pooling /
    flatten / reshape ops that lead to it; None when its value comes from no quantizer."""
    while isinstance(node, fx.Node):
        if is_act_quant(gm, node):
            return node
        if not is_pass_through(gm, node) or not node.args:
            return None
        node = node.args[0]
    return None


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


def quantize_model(model: nn.Module, bits: int = 8, backend: str | Backend = "academic") -> fx.GraphModule:
    """A BN-folded, fake-quantized copy of `model` (the float model is left untouched), with the quantizers and
    grids of `backend` (`pdq.quant.backends`). All quantizers start at `bits` and uncalibrated;
    `pdq.quant.layout.apply_layout` sets the real bit widths. The copy's parameters need no gradient: what
    reconstruction learns are parameters of its own (AdaRound, LSQ)."""
    b = get_backend(backend)
    gm = trace(copy.deepcopy(model).eval().requires_grad_(False))
    fold_bn(gm)
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if mod is not None and type(mod) in FLOAT_TO_QUANT:
            gm.set_submodule(node.target, FLOAT_TO_QUANT[type(mod)].from_float(mod, bits))
    if not quant_layer_names(gm):
        raise PdqError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    taken = {name for name, _ in gm.named_modules()}

    def insert(after: fx.Node, name: str, only: fx.Node | None = None) -> fx.Node:
        """An activation quantizer on `after`'s value, for all its users (or for `only`)."""
        name = _free_name(name, taken)
        taken.add(name)
        gm.add_submodule(name, ActQuantizer(bits))
        with gm.graph.inserting_after(after):
            q = gm.graph.call_module(name, (after,))
        if only is None:
            after.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        else:
            only.replace_input_with(after, q)
        return q

    for node in list(gm.graph.nodes):
        if is_quant_layer(gm, node):
            point, owner = _output_point(gm, node), node.target
            if b.runtime and point is not node and not is_absorbed_activation(gm, point):
                point = node  # the conv's own output: the activation after it runs between quantizers
        elif is_add(node):
            point, owner = _output_point(gm, node), _owner(node)
        else:
            continue
        if any(u.op == "output" for u in point.users):
            continue  # logits stay in full precision
        if is_quant_layer(gm, node) and all(is_add(u) for u in point.users) and b.add_inputs != "all":
            continue  # residual-branch end or shortcut: the block output quantizer covers it
        insert(point, f"{owner}.aq" if owner else "aq")
    if b.quantize_input:
        insert(_endpoints_input(gm), "input_aq")
    if b.add_inputs == "residual":
        _quantize_residual_inputs(gm, insert)
    if b.layer_inputs:
        for node in list(gm.graph.nodes):
            if is_quant_layer(gm, node) and quantizer_before(gm, node.args[0]) is None:
                parent, _, leaf = node.target.rpartition(".")
                insert(node.args[0], f"{parent}.{leaf}_in_aq" if parent else f"{leaf}_in_aq", only=node)
    gm.graph.lint()
    gm.recompile()
    gm.pdq_backend = b.name
    set_grids(gm, b)
    return gm


def backend_of(gm: fx.GraphModule) -> str:
    """The backend a quantized graph was built for (`quantize_model`)."""
    return getattr(gm, "pdq_backend", "academic")


def _endpoints_input(gm: fx.GraphModule) -> fx.Node:
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise PdqError(f"the model has {len(inputs)} inputs; pdq quantizes models with one input tensor")
    return inputs[0]


def _quantize_residual_inputs(gm: fx.GraphModule, insert) -> None:
    """TensorRT: each add fuses with one conv that feeds it directly; its other (residual) input must carry a
    quantizer. Of two conv inputs, the residual one is the shortcut: the one with fewer layers before it."""
    for node in list(gm.graph.nodes):
        if not is_add(node):
            continue
        values = [a for a in node.args if isinstance(a, fx.Node)]
        if len(values) != 2 or any(quantizer_before(gm, v) is not None for v in values):
            continue
        convs = [v for v in values if is_quant_layer(gm, v)]
        if len(convs) == 2:
            depth = [sum(is_quant_layer(gm, a) for a in ancestors(v)) for v in values]
            residual = values[0] if depth[0] < depth[1] else values[1]
        else:
            residual = next(v for v in values if v not in convs)
        owner = _owner(node)
        insert(residual, f"{owner}.res_aq" if owner else "res_aq", only=node)


def ancestors(node: fx.Node, within: Callable[[fx.Node], bool] = lambda n: True) -> set[fx.Node]:
    """Every node `node` depends on (not itself), walking back only through nodes accepted by `within`."""
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and within(a):
                seen.add(a)
                todo.append(a)
    return seen


def set_grids(gm: fx.GraphModule, backend: str | Backend) -> None:
    """Every quantizer of `gm` on its grid under `backend`: weights signed symmetric narrow-range codes for a
    runtime backend; activations signed symmetric (tensorrt), or unsigned with zero point 0 after ReLU/ReLU6 and
    affine elsewhere (onnxruntime); the papers' unsigned affine grid throughout for academic."""
    b = get_backend(backend)
    if not b.runtime:
        return
    for name in quant_layer_names(gm):
        gm.get_submodule(name).weight_quant.set_grid(signed=True, symmetric=True, narrow=True)
    for node in gm.graph.nodes:
        if is_act_quant(gm, node):
            after_relu = is_absorbed_activation(gm, node.args[0])
            gm.get_submodule(node.target).set_grid(signed=b.signed_acts, symmetric=b.signed_acts or after_relu,
                                                   narrow=False)
    if b.int32_bias:
        for node in gm.graph.nodes:
            if is_quant_layer(gm, node):
                source = quantizer_before(gm, node.args[0])
                gm.get_submodule(node.target).link_bias(gm.get_submodule(source.target) if source else None)


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


def input_quantizer(gm: fx.GraphModule) -> str | None:
    """The activation quantizer on the model input (a runtime backend's), or None."""
    return next((u.target for n in gm.graph.nodes if n.op == "placeholder" for u in n.users
                 if is_act_quant(gm, u)), None)


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


def integer_plan(gm: fx.GraphModule) -> dict:
    """Which conv/linear layers and adds the runtime's 8-bit integer kernels will run, and why each other one
    stays float (`{"backend", "integer": [...], "float": {name: reason}}`), read from the quantized graph: a layer
    runs integer when its weights are 8-bit codes on the backend's grid, an 8-bit quantizer is before it and one
    after it (the logits' layer may end in float; under tensorrt a conv may end in the add it fuses with); an add
    when both inputs and its output (after ReLU) carry 8-bit quantizers. The export's fusion audit checks what
    onnxruntime made of it."""
    backend = get_backend(backend_of(gm))
    plan: dict = {"backend": backend.name, "integer": [], "float": {}}

    def eight_bit(node: fx.Node | None) -> str | None:
        """None when `node` is an active 8-bit quantizer, else why not."""
        if node is None:
            return "no quantizer"
        bits = gm.get_submodule(node.target).bits
        return None if bits == 8 else ("a full-precision quantizer" if bits >= 32 else f"a {bits}-bit quantizer")

    def after(node: fx.Node) -> str | None:
        point = _output_point(gm, node)
        if point is not node and not is_absorbed_activation(gm, point):
            return f"an activation ({point.name}) with no integer kernel follows it"
        users = list(point.users)
        if any(u.op == "output" for u in users) and is_quant_layer(gm, node):
            return None  # QGemm / a float-output integer kernel
        if backend.add_inputs == "residual" and is_quant_layer(gm, node) and users and all(is_add(u) for u in users):
            return None  # fused with the add (its output quantizer is checked with the add)
        worst = [eight_bit(u if is_act_quant(gm, u) else None) for u in users] or ["no quantizer"]
        return next((f"{r} after it" for r in worst if r is not None), None)

    for node in gm.graph.nodes:
        if is_quant_layer(gm, node):
            wq = gm.get_submodule(node.target).weight_quant
            if not backend.runtime:
                reason = "academic backend: the papers' grids and placement (quant.backend=onnxruntime|tensorrt)"
            elif wq.bits != 8:
                reason = "weights in full precision" if wq.bits >= 32 else f"weights at {wq.bits} bits"
            else:
                before = eight_bit(quantizer_before(gm, node.args[0]))
                reason = f"{before} before it" if before else after(node)
        elif is_add(node):
            values = [a for a in node.args if isinstance(a, fx.Node)]
            fused = backend.add_inputs == "residual" and any(is_quant_layer(gm, v) for v in values)
            before = [eight_bit(quantizer_before(gm, v)) for v in values if not (fused and is_quant_layer(gm, v))]
            reason = ("academic backend: the papers' grids and placement" if not backend.runtime else
                      next((f"{r} on an input" for r in before if r is not None), None) or after(node))
        else:
            continue
        key = node.target if is_quant_layer(gm, node) else node.name
        if reason is None:
            plan["integer"].append(key)
        else:
            plan["float"][key] = reason
    return plan


def log_integer_plan(plan: dict) -> None:
    """What the backend's integer kernels will run (`pdq.quant.graph.integer_plan`), each float layer named."""
    total = len(plan["integer"]) + len(plan["float"])
    if plan["backend"] == "academic":
        log.info("backend=academic: the papers' placement and grids, a simulation (quant.backend=onnxruntime or "
                 "tensorrt quantizes for a runtime's integer kernels)")
        return
    log.info("backend=%s: integer kernels for %d of %d layers and adds", plan["backend"], len(plan["integer"]), total)
    for name, reason in plan["float"].items():
        log.info("  stays float: %s (%s)", name, reason)
