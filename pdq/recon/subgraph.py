"""Runnable pieces of a quantized graph. They share the graph's modules (so what a piece learns, the
whole model has) but not its code:

* `prefix(gm, node)`: graph input -> value of `node` (e.g. a unit's input, for caching);
* `segment(gm, unit)`: unit input -> unit output (one reconstruction step's forward);
* `suffix(gm, node)`: value of `node` -> network output (the rest of the network, for PD-Quant); a
  node inside a branch also takes its enclosing unit's input;
* `between(gm, inputs, node)`: values of `inputs` -> value of `node`, or None when `node` also depends on the
  graph input by another path (e.g. the next unit's input from the previous one's, for caching).
Every piece keeps the original node names and meta."""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx

from pdq.quant.graph import ancestors
from pdq.recon.units import Unit


def _build(gm: fx.GraphModule, nodes: Iterable[fx.Node], inputs: list[fx.Node], output: fx.Node,
           name: str) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"input_{i}" if node.op != "placeholder" else node.name)
        env[node].meta = dict(node.meta)
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    return fx.GraphModule(gm, graph, class_name=name)


def prefix(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    needed = ancestors(node) | {node}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    body = [n for n in gm.graph.nodes if n in needed and n.op != "placeholder"]
    return _build(gm, body, placeholders, node, "Prefix")


def segment(gm: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    return _build(gm, unit.nodes, [unit.input], unit.output, "Unit")


def between(gm: fx.GraphModule, inputs: list[fx.Node], node: fx.Node, name: str = "Piece"
            ) -> fx.GraphModule | None:
    """`node` as a function of `inputs`, or None when some path from the graph input reaches `node` without
    passing through them."""
    needed = set() if node in inputs else ancestors(node, lambda a: a not in inputs) | {node}
    if any(n.op == "placeholder" for n in needed):
        return None
    return _build(gm, [n for n in gm.graph.nodes if n in needed], inputs, node, name)


def suffix(gm: fx.GraphModule, node: fx.Node, also: fx.Node | None = None) -> fx.GraphModule:
    """Network output as a function of `node` (and of `also`: the input of the unit enclosing `node`, when
    `node` lies inside a branch). Every path from the input must pass through them."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    rest = between(gm, [node] if also is None else [node, also], output, "Suffix")
    if rest is None:
        raise ValueError(f"the rest of the network after {node.name} also reads the graph input: "
                         f"{node.name} is not a cut point of the graph")
    return rest
