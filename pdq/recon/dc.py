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
from pdq.recon.store import CacheStore, dim_order
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


#: the input values of the images that one forward and backward of a DC step runs together (at least a batch of
#: images): small maps run in few calls (one over a ResNet-20's last stage), large ones in small batches
STEP_VALUES = 2 ** 22


def step_rows(batch_size: int, values_per_image: int) -> int:
    """Images per forward and backward inside a DC step: `batch_size`, or more while they hold `STEP_VALUES`."""
    return max(batch_size, STEP_VALUES // max(values_per_image, 1))


def correct(unit_fp: nn.Module, bns: list[nn.Module], x_fp: torch.Tensor, cfg: DCConfig,
            desc: str = "DC", dist: Dist = SINGLE, batch_size: int | None = None,
            device: torch.device | None = None) -> tuple[torch.Tensor, dict]:
    """DC-corrected copy of `x_fp` (same shape; on `device`, default `x_fp`'s), and the BN-statistic loss
    before/after. Each step runs `unit_fp` only up to the inputs of `bns` (`bn_inputs`), over
    `step_rows(batch_size, ...)` images at a time (None: the whole chunk at once): the loss is a sum over
    images, so each image's gradient is the same whichever images share its forward (bit for bit), and a step
    holds the activations of one batch instead of the chunk's. What a step holds for the whole chunk is the
    corrected input, its gradient and Adam's two moments.
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
            target = x_fp[start:start + chunk]
            denominator = n_global if whole else len(target)
            # Adam's variable is the chunk in its own memory order, a contiguous tensor: fused Adam would
            # otherwise copy a channels-last x to contiguous and back at every step
            order = dim_order(target)
            back = [order.index(d) for d in range(target.dim())]
            dense = target.permute(order).to(device or x_fp.device, torch.float32,
                                             memory_format=torch.contiguous_format, copy=True)
            dense.grad = torch.empty_like(dense)
            opt = torch.optim.Adam([dense], lr=cfg.lr, fused=True)  # one pass over x per step
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience, factor=cfg.factor,
                                                                 min_lr=cfg.min_lr)
            step_batch = len(dense) if batch_size is None else step_rows(batch_size, dense[0].numel())
            for step in range(cfg.steps + 1):
                final = step == cfg.steps
                stats = loss = 0.0
                for b in range(0, len(dense), step_batch):  # the gradient of each batch into its rows of grad
                    rows = dense[b:b + step_batch].detach().requires_grad_(not final)
                    x = rows.permute(back)
                    with torch.set_grad_enabled(not final):
                        batch_stats = bn_statistics_loss(cut(x), bns, denominator)
                        stats += batch_stats.item()
                        if final:
                            continue
                        batch_loss = batch_stats + proximity_loss(
                            x, target[b:b + step_batch].to(dense.device, torch.float32), denominator) / cfg.lambda_c
                    dense.grad[b:b + step_batch] = torch.autograd.grad(batch_loss, rows)[0]
                    loss += batch_loss.item()
                if step == 0:
                    before += stats * denominator
                if final:
                    after += stats * denominator
                    break
                opt.step()
                plateau.step(dist.sum(loss)[0] if whole else loss)
                bar.update(1)
            out.append(dense.detach().permute(back).to(x_fp.dtype))
            del dense, opt, plateau
    finally:
        bar.close()
    before, after = dist.sum(before, after)
    return torch.cat(out) if len(out) > 1 else out[0], {"dc_loss_before": round(before / n_global, 6),
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
                 dtype: torch.dtype, device: torch.device, dist: Dist = SINGLE, store: CacheStore | None = None):
        self.root, self.dtype, self.device, self.dist = root, dtype, device, dist
        self.store = store if store is not None else CacheStore(None, device)  # where a hit is put
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
            return self.store.put(x), info

        hit = found.load(check)
        hits = self.dist.sum(float(hit is not None))[0]
        return hit if hits == self.dist.world_size else None

    def save(self, found: Entry, x: torch.Tensor, info: dict) -> None:
        found.save({"x": x.detach().cpu(), "info": info})
