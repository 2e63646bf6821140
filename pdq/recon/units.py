"""Cut a quantized graph into reconstruction units (spec §2.3-§2.4), from the graph itself.

`pattern="block"`:
1. **Cut points.** A cut point is a node that every path from the input to the output passes through.
   The nodes between two consecutive cut points form an *atom*: one entry, one exit, and every branch,
   concat, split, channel shuffle and SE gate that starts inside it ends inside it.
2. **Modules.** A submodule that is not a plain container (Sequential, ModuleList, ModuleDict), whose
   nodes are exactly a run of whole atoms (its entry and exit are cut points) and that holds at least
   two weight layers is a *candidate* (BRECQ's blocks: a `BasicBlock`, an `InvertedResidual`, an
   Inception or Fire module). Walking the module tree from the top, a candidate is one unit unless it
   holds two disjoint candidates (a stage of blocks: it is split into them), or more than
   `MAX_UNIT_LAYERS` weight layers over more than one atom (split into its submodules too).
3. **Atoms.** Every atom with a weight layer that no chosen module covers is a unit of its own: one
   layer (a stem, a head, a layer of a plain chain), or a region of branches that no single module
   holds (e.g. a residual add written in the model's top-level forward).
4. **Activations.** The activations and activation quantizers right after a unit belong to it; the other
   weight-free atoms (pooling, flatten, a BatchNorm after a concat) are glue between units.
Every unit's input and output are then cut points, so the FP rest of the network (PD-Quant's term)
is a function of the unit output alone. An indivisible atom (a dense block) may hold more than
`MAX_UNIT_LAYERS` layers; the run warns about it. `register_block(cls)` is an optional hint: every
instance of `cls` whose entry and exit are cut points is one unit.

`merges=k` (MRECG, `method.unit_merges`): after steps 1-4, the k pairs of adjacent units whose *capacities*
differ most are reconstructed jointly, a pair's two units and the glue between them forming one unit (pairs that
share a unit chain into one unit of three or more). A unit's capacity is the sum over its weight layers of
parameters x weight bits (MRECG's data-free module capacity without its stride factor; MRECG's released code
uses hand-written merge tables per model instead). The first and the last unit are never merged: they are the
stem and the head, which run at other widths and have no neighbour on one side.

`pattern="layer"`: every conv/linear alone, with its activation and output quantizer (AdaRound).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx, nn

from pdq.errors import PdqError
from pdq.quant.graph import ancestors, is_act_quant, is_activation, is_quant_layer

log = logging.getLogger("pdq")
PATTERNS = ("block", "layer")
#: a module over several atoms with more weight layers than this is split into its submodules
MAX_UNIT_LAYERS = 6
#: module types that are one unit wherever their entry and exit are cut points (`register_block`)
BLOCK_TYPES: list[type[nn.Module]] = []
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def register_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Hint: make every instance of `cls` one reconstruction unit (usable as a class decorator). Units
    are found without hints; a hint only overrides the size rules of the module walk."""
    if cls not in BLOCK_TYPES:
        BLOCK_TYPES.append(cls)
    return cls


@dataclass
class Unit:
    name: str
    kind: str                 # "block" (several weight layers) or "layer" (one)
    nodes: list[fx.Node]      # in graph order
    input: fx.Node            # the one value entering the unit
    output: fx.Node           # the one value leaving it
    source: str = "layer"     # how it was found: module | registered | region | layer

    def layers(self, gm: fx.GraphModule) -> list[str]:
        return [n.target for n in self.nodes if is_quant_layer(gm, n)]

    def act_quants(self, gm: fx.GraphModule) -> list[str]:
        return [n.target for n in self.nodes if is_act_quant(gm, n)]

    def row(self, gm: fx.GraphModule) -> dict:
        """One line of the unit table (logged at the start of a run, kept in results.json)."""
        return {"name": self.name, "kind": self.kind, "source": self.source, "layers": self.layers(gm),
                "act_quants": self.act_quants(gm)}


def descendants(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _endpoints(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node]:
    """The graph's one input and its one output value."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if len(inputs) != 1 or not isinstance(output, fx.Node):
        raise PdqError(f"the model has {len(inputs)} inputs and returns {type(output).__name__}; pdq quantizes "
                       f"models with one input tensor and one output tensor")
    return inputs[0], output


def data_path(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes on some path from the input to the output (input and output value included), in graph
    order; parameters, constants and dead code are not on it."""
    source, sink = _endpoints(gm)
    on = (descendants(source) | {source}) & (ancestors(sink) | {sink})
    return [n for n in gm.graph.nodes if n in on]


def cut_points(path: list[fx.Node]) -> list[fx.Node]:
    """The nodes of `path` (a topological order of the input-to-output nodes) that every input-to-output
    path passes through: those that no edge jumps over."""
    pos = {n: i for i, n in enumerate(path)}
    cuts, reach = [], 0
    for i, n in enumerate(path):
        if reach <= i:
            cuts.append(n)
        reach = max([reach, *(pos[u] for u in n.users if u in pos)])
    return cuts


def _atoms(path: list[fx.Node]) -> list[list[fx.Node]]:
    """The runs of nodes after each cut point up to the next one."""
    cuts = set(cut_points(path))
    atoms, current = [], []
    for n in path[1:]:
        current.append(n)
        if n in cuts:
            atoms.append(current)
            current = []
    return atoms


def _stack(node: fx.Node) -> list[tuple[str, object]]:
    """The (path, type) of the modules `node` was traced in, outermost first; an inserted activation
    quantizer belongs where its input does."""
    while "nn_module_stack" not in node.meta and node.op == "call_module" and node.args:
        node = node.args[0]
    return [v if isinstance(v, tuple) else (str(v), None) for v in (node.meta.get("nn_module_stack") or {}).values()]


class _Partition:
    """The block-pattern units of one graph (module docstring, steps 1-4)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.path = data_path(gm)
        self.on_path = set(self.path)
        self.atoms = _atoms(self.path)
        self.atom_of = {n: k for k, atom in enumerate(self.atoms) for n in atom}
        self.layers = [sum(is_quant_layer(gm, n) for n in atom) for atom in self.atoms]
        self.members: dict[str, set[fx.Node]] = {}
        self.children: dict[str, list[str]] = {"": []}
        self.types: dict[str, object] = {}
        for n in self.path[1:]:
            parent = ""
            for module, cls in _stack(n):
                self.members.setdefault(module, set()).add(n)
                if module not in self.children:
                    self.children[module] = []
                    self.children[parent].append(module)
                    self.types[module] = cls
                parent = module

    def span(self, module: str) -> list[int] | None:
        """The atoms of `module` when its nodes are exactly whole, consecutive atoms; else None."""
        ks = sorted({self.atom_of[n] for n in self.members[module]})
        whole = all(n in self.members[module] for k in ks for n in self.atoms[k])
        return ks if whole and ks == list(range(ks[0], ks[-1] + 1)) else None

    def n_layers(self, ks: list[int]) -> int:
        return sum(self.layers[k] for k in ks)

    def registered(self, module: str) -> bool:
        cls = self.types.get(module)
        return isinstance(cls, type) and issubclass(cls, tuple(BLOCK_TYPES))

    def container(self, module: str) -> bool:
        cls = self.types.get(module)
        return isinstance(cls, type) and issubclass(cls, CONTAINERS)

    def candidate(self, module: str) -> bool:
        ks = self.span(module)
        return ks is not None and self.n_layers(ks) >= 2 and not self.container(module)

    def splits(self, module: str) -> bool:
        """A candidate is split when it spans several atoms with too many layers, or when it holds two
        disjoint candidate submodules (a stage of blocks; an SE gate inside a block is one, not two)."""
        ks = self.span(module)
        if len(ks) > 1 and self.n_layers(ks) > MAX_UNIT_LAYERS:
            return True
        return len(self.outermost_candidates(module, ks)) > 1

    def outermost_candidates(self, module: str, ks: list[int]) -> list[str]:
        found = []
        for child in self.children[module]:
            span = self.span(child)
            if self.candidate(child) and span != ks:
                found.append(child)
            else:
                found += self.outermost_candidates(child, ks)
        return found

    def named(self, module: str) -> str:
        """A module is named by the innermost non-container module of the same span (a stage of one block
        by the block, a block by itself rather than by its `conv` Sequential)."""
        chain = [module]
        while True:
            same = [c for c in self.children[chain[-1]] if self.span(c) == self.span(module)]
            if len(same) != 1:
                break
            chain.append(same[0])
        return [m for m in chain if not self.container(m)][-1]

    def chosen_modules(self, module: str = "") -> list[tuple[str, str]]:
        """(module, source) of the modules that are units, walking the tree from `module`."""
        found = []
        for child in self.children[module]:
            if self.registered(child) and self.span(child) is not None and self.n_layers(self.span(child)):
                found.append((child, "registered"))
            elif self.candidate(child) and not self.splits(child):
                found.append((self.named(child), "module"))
            else:
                found += self.chosen_modules(child)
        return found

    def units(self, merges: int = 0) -> list[Unit]:
        owner: dict[int, tuple[str, str]] = {}
        for module, source in self.chosen_modules():
            for k in self.span(module):
                owner.setdefault(k, (module, source))
        groups: list[tuple[str, str, list[int]]] = []
        for k, atom in enumerate(self.atoms):
            if k in owner:
                name, source = owner[k]
                if groups and groups[-1][0] == name and groups[-1][1] == source:
                    groups[-1][2].append(k)
                    continue
                groups.append((name, source, [k]))
            elif self.layers[k]:
                layers = [n.target for n in atom if is_quant_layer(self.gm, n)]
                single = len(atom) == 1
                groups.append((layers[0] if single else _common_prefix(layers) or f"region@{atom[-1].name}",
                               "layer" if single else "region", [k]))
            elif groups and groups[-1][2][-1] == k - 1 and self._is_trailing(atom):
                groups[-1][2].append(k)  # an activation / activation quantizer right after a unit
        taken: set[str] = set()
        return [self.make(_unique(name, taken), source, ks) for name, source, ks in self.merged(groups, merges)]

    def capacity(self, ks: list[int]) -> float:
        """Parameters x weight bits over the weight layers of the atoms `ks` (`merges` in the module docstring)."""
        layers = [self.gm.get_submodule(n.target) for k in ks for n in self.atoms[k] if is_quant_layer(self.gm, n)]
        return float(sum(m.weight.numel() * m.weight_quant.bits for m in layers))

    def merged(self, groups: list[tuple[str, str, list[int]]], merges: int) -> list[tuple[str, str, list[int]]]:
        """`groups` with the `merges` adjacent pairs of largest capacity difference joined, with the glue
        atoms between them; ties go to the earlier pair."""
        if merges == 0:
            return groups
        pairs = list(range(1, len(groups) - 2))  # pair j joins groups j and j + 1; never the first or the last
        if merges > len(pairs):
            raise PdqError(f"method.unit_merges={merges} is more than this model has: its {len(groups)} units "
                           f"give {len(pairs)} pairs of adjacent units that may merge (the first and the last "
                           f"unit never do); accepted: 0..{len(pairs)}")
        cap = [self.capacity(ks) for _, _, ks in groups]
        chosen = set(sorted(pairs, key=lambda j: (-abs(cap[j + 1] - cap[j]), j))[:merges])
        out: list[tuple[str, str, list[int]]] = []
        for j, (name, source, ks) in enumerate(groups):
            if j - 1 in chosen:
                last_name, _, last_ks = out[-1]
                out[-1] = (f"{last_name}+{name}", "merged", list(range(last_ks[0], ks[-1] + 1)))
            else:
                out.append((name, source, ks))
        return out

    def _is_trailing(self, atom: list[fx.Node]) -> bool:
        return len(atom) == 1 and (is_activation(self.gm, atom[0]) or is_act_quant(self.gm, atom[0]))

    def make(self, name: str, source: str, ks: list[int]) -> Unit:
        nodes = [n for k in ks for n in self.atoms[k]]
        entry = self.path[0] if ks[0] == 0 else self.atoms[ks[0] - 1][-1]
        kind = "block" if self.n_layers(ks) > 1 else "layer"
        return Unit(name, kind, _with_constants(nodes, self.on_path), entry, nodes[-1], source)


def _with_constants(nodes: list[fx.Node], on_path: set[fx.Node]) -> list[fx.Node]:
    """`nodes` and the nodes off the data path that they read (parameters, constants), in graph order."""
    inside = set(nodes)
    for n in nodes:
        inside |= ancestors(n, lambda a: a not in on_path)
    return [n for n in nodes[0].graph.nodes if n in inside]


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix[:-1] if len(prefix) == len(parts[0]) else prefix)


def _layer_units(gm: fx.GraphModule) -> list[Unit]:
    on_path, units = set(data_path(gm)), []
    for n in gm.graph.nodes:
        if is_quant_layer(gm, n):
            nodes, point = [n], n
            while len(point.users) == 1:
                (user,) = point.users
                if not (is_activation(gm, user) or is_act_quant(gm, user)):
                    break
                nodes.append(user)
                point = user
            units.append(Unit(n.target, "layer", _with_constants(nodes, on_path), n.args[0], nodes[-1], "layer"))
    return units


def find_units(gm: fx.GraphModule, pattern: str = "block", merges: int = 0) -> list[Unit]:
    """The units of `pattern`; `merges`: adjacent block units reconstructed jointly (module docstring)."""
    if pattern not in PATTERNS:
        raise PdqError(f"pattern={pattern!r} is unknown; accepted: {', '.join(PATTERNS)}")
    if pattern == "layer":
        if merges:
            raise PdqError(f"method.unit_merges={merges} needs pattern=block (it merges block units); accepted: 0 "
                           f"with pattern=layer")
        return _layer_units(gm)
    return _Partition(gm).units(merges)


def enclosing(gm: fx.GraphModule, units: list[Unit]) -> list[Unit | None]:
    """For each of `units`, the block-pattern unit that holds its output when that output is no cut point (a
    layer inside a branch), else None: the FP rest of the network then also reads that unit's input. The graph
    is partitioned once for all of them (and not at all when every output is a cut point)."""
    cuts = set(cut_points(data_path(gm)))
    blocks = find_units(gm, "block") if any(u.output not in cuts for u in units) else []
    return [None if u.output in cuts else next(b for b in blocks if u.output in b.nodes) for u in units]


def warn_about(gm: fx.GraphModule, units: list[Unit], pattern: str) -> list[str]:
    """The warnings a unit table earns: units larger than `MAX_UNIT_LAYERS` weight layers, and a block
    pattern that found no block for most of the model's layers."""
    warnings = [f"unit {u.name} holds {len(u.layers(gm))} weight layers (more than {MAX_UNIT_LAYERS}): it has "
                f"no cut point inside, so it is reconstructed as one unit" for u in units
                if len(u.layers(gm)) > MAX_UNIT_LAYERS and u.source != "merged"]
    if pattern == "block":
        single = sum(len(u.layers(gm)) for u in units if u.kind == "layer")
        total = sum(len(u.layers(gm)) for u in units)
        if single * 2 > total:
            warnings.append(f"{single} of {total} weight layers are single-layer units: the graph has no "
                            f"multi-layer module between cut points for them (a plain chain?); "
                            f"pdq.recon.register_block(cls) groups a module type")
    return warnings


def log_unit_table(rows: list[dict]) -> None:
    """The reconstruction units, one line each, and the warnings the table earns (`pdq.recon.units`)."""
    for pattern in dict.fromkeys(row["pattern"] for row in rows):
        mine = [row for row in rows if row["pattern"] == pattern]
        log.info("%d units (pattern=%s): name | found by | weight layers | activation quantizers", len(mine), pattern)
        for i, row in enumerate(mine):
            layers = ", ".join(row["layers"])
            log.info("  %2d %s | %s | %d: %s | %d", i, row["name"], row["source"], len(row["layers"]),
                     layers if len(layers) <= 100 else layers[:97] + "...", len(row["act_quants"]))
    for row in rows:
        for warning in row.get("warnings", []):
            log.warning("%s", warning)
