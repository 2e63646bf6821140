"""Distribution Correction (PD-Quant, spec §5.3): move a unit's FP input so that the per-sample
statistics at every BatchNorm inside the unit (in the *unfolded* FP model) match the BN running
statistics, while staying close to the original input (the two terms are in `pdq.recon.losses`):

    L(x) = bn_statistics_loss(x) + proximity_loss(x, x_fp) / lambda_c

Adam with ReduceLROnPlateau on the total loss; the settings are `method.dc` (`DCConfig`). The official
code corrects batches of 32; the loss is separable per sample and Adam is per element, so pdq runs the
same steps over larger chunks of the calibration set (`chunk`).

A unit's corrected inputs depend only on the float model, the calibration images, the unit and the DC
settings, not on the bits or the method: `DCStore` keeps them under `paths.cache_dir` (`pdq.cache`), so
that a sweep computes them once per model and calibration set."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import fx, nn

from pdq.cache import Entry, describe, entry
from pdq.distributed import SINGLE, Dist, compute_tag
from pdq.errors import PdqError
from pdq.recon.losses import bn_statistics_loss, proximity_loss
from pdq.recon.phase import DCConfig
from pdq.recon.units import Unit

log = logging.getLogger("pdq")


def fp_twin(fp_gm: fx.GraphModule, gm: fx.GraphModule, unit: Unit) -> tuple[fx.GraphModule, list[nn.Module]]:
    """The unit as a piece of the unfolded FP graph `fp_gm` (traced from the same float model), and the
    BatchNorm modules inside it. Node names survive folding, so the unit is found by name."""
    fp_nodes = {n.name: n for n in fp_gm.graph.nodes}
    names = {n.name for n in unit.nodes}
    members = [n for n in fp_gm.graph.nodes if n.name in names]
    bns = []
    for n in fp_gm.graph.nodes:  # BatchNorms whose input is inside the unit (folded away in gm, or not)
        if _is_bn(fp_gm, n) and isinstance(n.args[0], fx.Node) and n.args[0].name in names:
            if n.name not in names:
                members.append(n)
                names.add(n.name)
            bns.append(fp_gm.get_submodule(n.target))
    members.sort(key=list(fp_gm.graph.nodes).index)
    source = unit.input
    while source.name not in fp_nodes:  # an activation quantizer: step back to the value it quantizes
        source = source.args[0]
    fp_source = fp_nodes[source.name]
    while len(fp_source.users) == 1 and _is_bn(fp_gm, next(iter(fp_source.users))):
        fp_source = next(iter(fp_source.users))  # a BatchNorm that folding removed from `gm`
    inside = set(members)
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env = {fp_source: graph.placeholder("x")}
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[outputs[-1]] if outputs else env[members[-1]])
    return fx.GraphModule(fp_gm, graph, class_name="FPUnit"), bns


def bn_inputs(unit: nn.Module, bns: list[nn.Module]) -> tuple[fx.GraphModule, list[nn.Module]]:
    """`unit` cut down to what DC's loss reads: a graph that returns the input of every call of a module in
    `bns`, in execution order, and computes nothing else (no BatchNorm output, add or ReLU after the last
    one); and the BatchNorm of each returned input."""
    gm = unit if isinstance(unit, fx.GraphModule) else fx.symbolic_trace(unit)
    graph = copy.deepcopy(gm.graph)
    wanted = {id(bn) for bn in bns}
    calls = [n for n in graph.nodes if n.op == "call_module" and id(gm.get_submodule(n.target)) in wanted]
    if {id(gm.get_submodule(n.target)) for n in calls} != wanted:
        raise ValueError(f"{len(bns)} BatchNorms given, {len(calls)} calls of them found in the unit's graph")
    graph.erase_node(next(n for n in graph.nodes if n.op == "output"))
    graph.output(tuple(n.args[0] for n in calls))
    cut = fx.GraphModule(gm, graph, class_name="BNInputs")
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut, [gm.get_submodule(n.target) for n in calls]


def _is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)


def check_chunk(cfg: DCConfig, n_local: int, dist: Dist) -> None:
    """In a DDP run each rank corrects its own shard. Chunks must then be the whole set (the ranks step
    in lockstep on the summed loss) or whole chunks of every shard, so that the result is the one
    process's result."""
    if dist.enabled and cfg.enabled and cfg.chunk < n_local * dist.world_size and n_local % cfg.chunk:
        raise PdqError(f"method.dc.chunk={cfg.chunk} does not split the {n_local} calibration images of each of the "
                       f"{dist.world_size} processes into whole chunks; accepted: >= calib.size "
                       f"({n_local * dist.world_size}, one chunk) or a divisor of {n_local}")


def correct(unit_fp: nn.Module, bns: list[nn.Module], x_fp: torch.Tensor, cfg: DCConfig,
            desc: str = "DC", dist: Dist = SINGLE) -> tuple[torch.Tensor, dict]:
    """DC-corrected copy of `x_fp` (same shape, same device), and the BN-statistic loss before/after. Each
    step runs `unit_fp` only up to the inputs of `bns` (`bn_inputs`).
    Under DDP, `x_fp` is this rank's shard; with one chunk over the whole set the loss is normalised by
    the global set size and the LR plateau follows the loss summed over ranks, so every sample gets the
    update it gets in one process."""
    if not bns or not cfg.enabled:
        return x_fp, {}
    from tqdm.auto import tqdm

    check_chunk(cfg, len(x_fp), dist)
    cut, bns = bn_inputs(unit_fp, bns)
    n_global = len(x_fp) * dist.world_size
    whole = cfg.chunk >= n_global
    chunk = len(x_fp) if whole else cfg.chunk
    out, before, after = [], 0.0, 0.0
    bar = tqdm(total=cfg.steps * -(-len(x_fp) // chunk), desc=desc, leave=False, dynamic_ncols=True,
               disable=dist.progress_disable)
    try:
        for start in range(0, len(x_fp), chunk):
            target = x_fp[start:start + chunk].float()
            denominator = n_global if whole else len(target)
            # Adam's variable is the chunk in its own memory order, a contiguous tensor: fused Adam would
            # otherwise copy a channels-last x to contiguous and back at every step
            order = sorted(range(target.dim()), key=lambda d: -target.stride(d))
            dense = target.permute(order).clone(memory_format=torch.contiguous_format).requires_grad_(True)
            x = dense.permute([order.index(d) for d in range(target.dim())])
            opt = torch.optim.Adam([dense], lr=cfg.lr, fused=True)  # one pass over x per step
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, factor=cfg.factor,
                                                                 min_lr=cfg.min_lr)
            for step in range(cfg.steps + 1):
                stats = bn_statistics_loss(cut(x), bns, denominator)
                if step == 0:
                    before += stats.item() * denominator
                if step == cfg.steps:
                    after += stats.item() * denominator
                    break
                loss = stats + proximity_loss(x, target, denominator) / cfg.lambda_c
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=[dense])  # the input's gradient only, whatever the twin's parameters
                opt.step()
                plateau.step(dist.sum(loss.item())[0] if whole else loss.item())
                bar.update(1)
            out.append(x.detach().to(x_fp.dtype))
    finally:
        bar.close()
    before, after = dist.sum(before, after)
    return torch.cat(out), {"dc_loss_before": round(before / n_global, 6),
                            "dc_loss_after": round(after / n_global, 6)}


DC_REVISION = 2  # part of every DC cache key: bump it when DC's arithmetic changes, so that older entries miss


class DCStore:
    """DC results in the cache's `dc` namespace (`pdq.cache`): an entry holds a unit's corrected FP inputs (this
    process's shard) and its BN-statistic losses. Its key covers everything the result depends on, down to the
    bits: the float model's weights and buffers, the calibration images (hence the data config, the seed and the
    indices), this process's shard, the unit's nodes, the DC settings, the cache dtype and batch size, the
    device, thread count and torch version, and `DC_REVISION`. An entry that does not load or does not match is
    a miss, recomputed and overwritten."""

    def __init__(self, root: str | Path, fp_model: nn.Module, calib: torch.Tensor, *, batch_size: int,
                 dtype: torch.dtype, device: torch.device, dist: Dist = SINGLE):
        self.root, self.dtype, self.device, self.dist = root, dtype, device, dist
        self.fields = {"fp_model": describe(fp_model), "calib": describe(calib), "rank": dist.rank,
                       "world_size": dist.world_size, "batch_size": batch_size, "dtype": str(dtype),
                       "compute": compute_tag(device), "revision": DC_REVISION}

    def entry(self, unit: Unit, cfg: DCConfig) -> Entry:
        return entry(self.root, "dc", {"unit": {"input": unit.input.name, "output": unit.output.name,
                                                "nodes": [n.name for n in unit.nodes]},
                                       "dc": cfg, **self.fields}, self.device)

    def load(self, found: Entry, rows: int) -> tuple[torch.Tensor, dict] | None:
        """The entry if it is whole and fits (`rows` finite images in the cache dtype), else None; the answer is
        every rank's (a hit only where every rank hits), so that all ranks then do the same work."""
        def check(raw):
            x, info = raw["x"], dict(raw["info"])
            if not (isinstance(x, torch.Tensor) and x.dtype == self.dtype and len(x) == rows
                    and torch.isfinite(x).all()):
                raise ValueError(f"holds {type(x).__name__} {getattr(x, 'shape', '')}, not {rows} finite rows "
                                 f"of {self.dtype}")
            return x.to(self.device), info

        hit = found.load(check)
        hits = self.dist.sum(float(hit is not None))[0]
        return hit if hits == self.dist.world_size else None

    def save(self, found: Entry, x: torch.Tensor, info: dict) -> None:
        found.save({"x": x.detach().cpu(), "info": info})
