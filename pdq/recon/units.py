"""Cut a quantized graph into reconstruction units (spec §2.3-§2.4).

* `pattern="block"`: every module whose type is in `BLOCK_TYPES` (torchvision's residual blocks, or
  any class passed to `register_block`) is one unit. A residual `add` outside any registered block is
  grouped with everything between the point where its branches fork and the add (the fallback for
  CNNs the registry does not know). Every other conv/linear is a unit of its own.
* `pattern="layer"`: every conv/linear alone (AdaRound).
A layer's activation and output quantizer belong to the layer's unit; pooling, flatten and quantizers
outside any unit stay as glue between units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn
from torchvision.models import efficientnet, mnasnet, mobilenetv2, mobilenetv3, regnet, resnet

from pdq.errors import PdqError
from pdq.quant.graph import is_act_quant, is_activation, is_add, is_quant_layer

BLOCK_TYPES: list[type[nn.Module]] = [
    resnet.BasicBlock, resnet.Bottleneck, mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual,
    regnet.ResBottleneckBlock, mnasnet._InvertedResidual, efficientnet.MBConv, efficientnet.FusedMBConv,
]
PATTERNS = ("block", "layer")


def register_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Make every instance of `cls` one reconstruction unit (usable as a class decorator)."""
    if cls not in BLOCK_TYPES:
        BLOCK_TYPES.append(cls)
    return cls


@dataclass
class Unit:
    name: str
    kind: str                 # "block" or "layer"
    nodes: list[fx.Node]      # in graph order
    input: fx.Node            # the one value entering the unit
    output: fx.Node           # the one value leaving it

    def layers(self, gm: fx.GraphModule) -> list[str]:
        return [n.target for n in self.nodes if is_quant_layer(gm, n)]

    def act_quants(self, gm: fx.GraphModule) -> list[str]:
        return [n.target for n in self.nodes if is_act_quant(gm, n)]


def _registered_block(node: fx.Node) -> str | None:
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(cls, type) and issubclass(cls, tuple(BLOCK_TYPES)):
            return path  # outermost registered block
    return None


def ancestors(node: fx.Node, within: Callable[[fx.Node], bool] = lambda n: True) -> set[fx.Node]:
    """Every node `node` depends on (not itself), walking back only through nodes accepted by `within`."""
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and within(a):
                seen.add(a)
                todo.append(a)
    return seen


def _residual_region(add: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, set[fx.Node]]:
    """The fork point of `add`'s branches, and the nodes strictly between it and the add."""
    a, b = add.all_input_nodes[:2]
    anc_a, anc_b = ancestors(a) | {a}, ancestors(b) | {b}
    fork = max(anc_a & anc_b, key=order.__getitem__)
    return fork, ancestors(add, lambda n: order[n] > order[fork]) | {add}


def find_units(gm: fx.GraphModule, pattern: str = "block") -> list[Unit]:
    if pattern not in PATTERNS:
        raise PdqError(f"pattern={pattern!r} is unknown; accepted: {', '.join(PATTERNS)}")
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    key: dict[fx.Node, str] = {}
    kind: dict[str, str] = {}
    if pattern == "block":
        for n in nodes:
            block = _registered_block(n)
            if block is not None:
                key[n], kind[block] = block, "block"
        for n in nodes:  # fallback: residual structures the registry does not know
            if is_add(n) and n not in key:
                fork, region = _residual_region(n, order)
                names = {key[m] for m in region if m in key}
                layers = sorted(m.target for m in region if is_quant_layer(gm, m))
                name = min(names) if names else _common_prefix(layers) or f"block@{n.name}"
                for m in list(key):
                    if key[m] in names:
                        key[m] = name
                for m in region:
                    key[m] = name
                kind[name] = "block"
    for n in nodes:
        if n not in key and is_quant_layer(gm, n):
            key[n], kind[n.target] = n.target, "layer"
        elif n not in key and (is_activation(gm, n) or is_act_quant(gm, n)) and n.args and n.args[0] in key:
            key[n] = key[n.args[0]]
    groups: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n in key:
            groups.setdefault(key[n], []).append(n)
    return [_make_unit(name, kind[name], members) for name, members in groups.items()]


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix[:-1] if len(prefix) == len(parts[0]) else prefix)


def _make_unit(name: str, kind: str, members: list[fx.Node]) -> Unit:
    inside = set(members)
    inputs = {a for n in members for a in n.all_input_nodes if a not in inside}
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise PdqError(f"unit {name!r} has {len(inputs)} inputs and {len(outputs)} outputs; a reconstruction "
                       f"unit needs exactly one of each (register its enclosing block with register_block)")
    return Unit(name, kind, members, inputs.pop(), outputs[0])
