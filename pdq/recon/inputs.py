"""Unit inputs over the calibration set, cached incrementally along one path (the quantized graph or the FP
graph): the next unit's input is computed from the inputs this path cached last (through the unit that was
just reconstructed and any glue after it), not from the images through the whole prefix again. Where they
do not lead to the next input (the first unit of a run, or of a resumed run), the prefix runs from the
images. Both run the same operations on the same batches, so they give the same
values; only the amount of work differs (linear in the depth instead of quadratic)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from pdq.recon.subgraph import between, prefix
from pdq.recon.units import cut_points, data_path


class UnitInputs:
    """`inputs(node_name)` gives the value of that node over `images`; nodes are asked for in unit order.
    `run(module, x)` runs a piece over cached tensors in batches. It keeps two values: the last one asked
    for, and the last one at a cut point of the graph (a block input, which every later node depends on
    only through it). A value stays valid while the units after it are reconstructed, because reconstructing
    a unit changes only what lies downstream of its input. `from_prefix` counts the values that had to come
    from the images. With `chain=False` every value comes from the images (caches of a lower precision than
    float32: a value computed from a rounded one would differ from a resumed run's). The graph's input itself
    is `stem()`, the images as a cache, one tensor that every path shares (`from_prefix` does not count it)."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, run: Callable[..., torch.Tensor],
                 stem: Callable[[], torch.Tensor], chain: bool = True):
        self.gm, self.images, self.run, self.stem, self.chain = gm, images, run, stem, chain
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.cuts = set(cut_points(data_path(gm)))
        self.known: dict[fx.Node, torch.Tensor] = {}  # the last value, and the last value at a cut point
        self.from_prefix = 0

    def __call__(self, name: str) -> torch.Tensor:
        node = self.nodes[name]
        if node in self.known:
            return self.known[node]
        anchors = list(self.known) if self.chain else []
        piece = between(self.gm, anchors, node) if anchors and node.op != "placeholder" else None
        if node.op == "placeholder":
            value = self.stem()
        elif piece is None:
            self.from_prefix += 1
            value = self.run(prefix(self.gm, node), self.images)
        else:
            value = self.run(piece, *(self.known[a] for a in anchors))
        last_cut = node if node in self.cuts else next((a for a in anchors if a in self.cuts), None)
        self.known = {n: self.known.get(n, value) for n in dict.fromkeys((last_cut, node)) if n is not None}
        return value
