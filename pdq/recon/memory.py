"""The memory plan: what a run holds while it reconstructs each unit, added up before the first unit.

Every cached tensor has a name, a shape per image, a dtype, a place (the compute device, host memory, or
memory-mapped files on disk: `calib.cache_device`) and a lifetime:

| name | what | lifetime |
|---|---|---|
| images | the calibration images (float32, host) | the run |
| stem_input | the images as a cache: the first unit's input on every path, shared | the first unit |
| x_q | the unit's input on the quantized path | the unit, and computing the next unit's |
| x_fp | the unit's input on the FP path, uncorrected | the unit, and computing the next unit's |
| x_dc | the DC-corrected FP input | the unit's fit |
| y_fp | the FP output on the (corrected) FP input: the target | the unit's fit |
| rest_input | the input of the block enclosing a layer unit inside a branch (PD) | the unit's fit |
| logits | the FP network's logits (PD) | the run |

On top of them each stage of a unit has a working set: caching runs one batch at a time; DC holds the
corrected input, its gradient and Adam's two moments for a chunk (the whole set by default; float32) and one
batch's activations; the fit one batch's activations and gradients through the unit and, for PD, through the
rest of the network; activation initialisation runs `calib.act_init_size` images through the unit.
The sizes come from one image through the model (`probe`: every value's shape, and the bytes autograd saves
for the backward at each node); what a step and the observers hold beyond that are factors measured once
(`UNIT_FACTOR`, `REST_FACTOR`, `INIT_FACTOR`; docs/performance.md). The plan's peak is the
process's memory when the plan is made (the model, the data, the libraries; `base`) plus the largest stage.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from pdq.quant.state import full_precision
from pdq.recon.dc import step_rows
from pdq.recon.phase import Phase
from pdq.recon.units import cut_points, data_path, enclosing

MIB = 2 ** 20
#: what a step holds at its peak: per byte of the unit's values (its quantizers on: the fused quantizers' saved
#: inputs and masks, the mixed input, the gradients in flight), and per byte that autograd saves in the FP rest of
#: the network (PD, from `probe`). Fitted to the measured peaks of ResNet-18, MobileNetV2 and ResNet-50 at
#: 224x224 with 64 images, where the working set is most of the peak (docs/performance.md)
UNIT_FACTOR = 2.5
REST_FACTOR = 0.75
#: what activation initialisation holds per value of the unit's largest activation (the activation, the
#: observer's copy of it per channel, the quantized output), measured on ResNet-18 at 224x224
INIT_FACTOR = 5.0
#: a plan fits where its peak times this is available: the measured peaks at 224x224 were up to 1.17 times the plan
#: (docs/performance.md), and a run that passes the check should not meet the kernel's out-of-memory killer
FIT_MARGIN = 1.2


@dataclass
class Held:
    """One cached tensor: `shape` per image, `images` of them, in `dtype` on `where` (a device or disk)."""
    name: str
    shape: list[int]
    dtype: str
    where: str
    lifetime: str
    images: int

    @property
    def mib(self) -> float:
        size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.images * math.prod(self.shape) * size / MIB

    def row(self) -> dict:
        return {**asdict(self), "mib": round(self.mib, 1)}


@dataclass
class Stage:
    """What one stage of one unit holds: cached tensors and a working set (MiB on the compute device)."""
    unit: str
    phase: int
    stage: str                                  # cache | dc | act_init | fit | final
    held: list[Held] = field(default_factory=list)
    working_mib: float = 0.0

    def mib(self, where: str, compute: str) -> float:
        """MiB this stage adds on `where` (host or device)."""
        place = {"cpu": "host", "disk": "disk"}
        total = sum(h.mib for h in self.held if place.get(h.where, "device") == where)
        return total + (self.working_mib if place.get(compute, "device") == where else 0.0)


class _Probe(fx.Interpreter):
    """From one image: the shape per image of every node's value (None where it is no tensor), and the bytes
    autograd saves for the backward while running each node (each tensor counted once, at the first node that
    saves it; parameters and buffers, which do not grow with the batch, not at all)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, list[int] | None] = {}
        self.saved: dict[str, int] = {}
        self.seen = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
        self.current = ""

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.saved[self.current] = self.saved.get(self.current, 0) + t.untyped_storage().nbytes()
        return t

    def run_node(self, n: fx.Node):
        self.current = n.name
        out = super().run_node(n)
        self.shapes[n.name] = list(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() > 0 else None
        return out


def probe(gm: fx.GraphModule, image: torch.Tensor) -> tuple[dict[str, list[int] | None], dict[str, int]]:
    """`_Probe`'s shapes and saved bytes per image, from `image` (one, with its batch dim) through `gm` in full
    precision with a gradient for the input."""
    interp = _Probe(gm)
    with full_precision(gm), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(interp.pack, lambda t: t):
        interp.run(image.detach().to(torch.float32, copy=True).requires_grad_(True))  # its own storage
    return interp.shapes, interp.saved


def host_rss_mib() -> float:
    """This process's resident memory now (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return 0.0


def host_available_mib() -> float | None:
    """Host memory this process may still take: the kernel's MemAvailable, capped by a cgroup v2 limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) / 1024
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, (int(limit) - used) / MIB) if available is not None else None
    except (OSError, ValueError):
        pass
    return available


def processes_per_node(world_size: int) -> int:
    """The DDP processes on this node: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else all of them."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return min(int(value), world_size)
    return world_size


def unit_stages(gm: fx.GraphModule, phases: list[Phase], shapes: dict, saved: dict, *, images: int, batch_size: int,
                act_init_size: int, cache_dtype: str, cache_where: str, compute: str,
                reconstruct_stem: bool) -> list[Stage]:
    """The stages of every unit the phases reconstruct, each with what it holds (see the module's table)."""
    cuts = {n.name for n in cut_points(data_path(gm))}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    stages = []

    def elems(name: str) -> int:
        return math.prod(shapes.get(name) or [])

    def cache(name, node, lifetime, dtype=cache_dtype, where=cache_where):
        return Held(name, shapes.get(node.name) or [], dtype, where, lifetime, images)

    for p, phase in enumerate(phases):
        units = phase.units(gm)
        outers = enclosing(gm, units) if phase.uses_pd else [None] * len(units)
        for i, (unit, outer) in enumerate(zip(units, outers)):
            if i == 0 and not reconstruct_stem:
                continue
            stem = unit.input.op == "placeholder"
            inputs = ([cache("stem_input", unit.input, "the first unit")] if stem else
                      [cache("x_q", unit.input, "the unit and computing the next unit's"),
                       cache("x_fp", unit.input, "the unit and computing the next unit's")])
            if not stem and unit.input.name not in cuts:  # the block input the paths compute from (layer units)
                cut = max((c for c in cuts if order[c] < order[unit.input.name]), key=order.get, default=None)
                if cut is not None:
                    inputs += [Held(f"{k}_block_input", shapes.get(cut) or [], cache_dtype, cache_where,
                                    "the block's units", images) for k in ("x_q", "x_fp")]
            if not (phase.input_prob > 0 or phase.uses_pd) and not stem:
                inputs = [h for h in inputs if not h.name.startswith("x_q")]
            logits = [Held("logits", shapes.get(out_node.args[0].name) or [], "float32", compute, "the run",
                           images)] if phase.uses_pd else []
            largest = max((elems(n.name) for n in unit.nodes), default=0)
            unit_values = sum(elems(n.name) for n in unit.nodes)
            unit_saved = sum(saved.get(n.name, 0) for n in unit.nodes)
            fp32 = 4 / MIB
            stages.append(Stage(unit.name, p, "cache", inputs + logits,
                                2 * batch_size * max(largest, elems(unit.input.name)) * fp32))
            if phase.dc.enabled:
                chunk = min(phase.dc.chunk, images)  # a chunk's x, its gradient, Adam's moments; the chunks' results
                working = (4 * chunk + (images if chunk < images else 0)) * elems(unit.input.name) * fp32
                rows_dc = min(step_rows(batch_size, elems(unit.input.name)), images)
                stages.append(Stage(unit.name, p, "dc", inputs + logits,
                                    working + REST_FACTOR * rows_dc * unit_saved / MIB))
            corrected = [cache("x_dc", unit.input, "the unit's fit")] if phase.dc.enabled else []
            held = inputs + corrected + [cache("y_fp", unit.output, "the unit's fit")] + logits
            if outer is not None:
                held.append(cache("rest_input", outer.input, "the unit's fit"))
            if phase.act_quant:
                stages.append(Stage(unit.name, p, "act_init", held, INIT_FACTOR * min(act_init_size, images)
                                    * largest * fp32))
            rows = 2 * batch_size if phase.uses_pd and phase.pd_branch_drop and phase.rec_weight > 0 else batch_size
            rest = 0
            if phase.uses_pd:  # the FP rest of the network, fed the unit's output
                rest = sum(saved.get(n.name, 0) for n in gm.graph.nodes if order[n.name] > order[unit.output.name])
            stages.append(Stage(unit.name, p, "fit", held,
                                (UNIT_FACTOR * rows * unit_values * 4 + REST_FACTOR * batch_size * rest) / MIB))
    return stages


def final_stage(gm: fx.GraphModule, shapes: dict, act_init_size: int, images: int) -> Stage:
    """The activation quantizers that no unit initialised, from `act_init_size` images through the whole
    quantized model (after the units; the only stage of a method without reconstruction)."""
    largest = max((math.prod(s) for s in shapes.values() if s), default=0)
    return Stage("model", -1, "final", [], INIT_FACTOR * min(act_init_size, images) * largest * 4 / MIB)


def plan(stages: list[Stage], *, base: dict[str, float], images_held: Held, available: dict[str, float | None],
         compute: str, settings: dict) -> dict:
    """The plan: each stage's peak on the host and the device, the largest, and what is available."""
    rows = []
    for s in stages:
        host = base["host"] + images_held.mib + s.mib("host", compute)
        device = base.get("device", 0.0) + s.mib("device", compute) if compute != "cpu" else None
        rows.append({"phase": s.phase, "unit": s.unit, "stage": s.stage, "host_mib": round(host, 1),
                     "device_mib": None if device is None else round(device, 1),
                     "disk_mib": round(s.mib("disk", compute), 1), "working_mib": round(s.working_mib, 1),
                     "held": [h.row() for h in s.held]})
    top_host = max(rows, key=lambda r: r["host_mib"])
    out = {"settings": settings, "base_mib": {k: round(v, 1) for k, v in base.items()},
           "images": images_held.row(), "available_mib": available,
           "peak_mib": {"host": top_host["host_mib"]}, "peak_at": {"host": _where(top_host)}, "stages": rows}
    if compute != "cpu":
        top_device = max(rows, key=lambda r: r["device_mib"])
        out["peak_mib"]["device"] = top_device["device_mib"]
        out["peak_at"]["device"] = _where(top_device)
    return out


def _total(row: dict) -> float:
    return row["host_mib"] + (row["device_mib"] or 0.0)


def _where(row: dict) -> str:
    where = f"{row['unit']} ({row['stage']})"
    return where if row["phase"] <= 0 else f"phase {row['phase']} {where}"


def does_not_fit(p: dict) -> list[str]:
    """The places ('host', 'device') where the plan's peak, with the `FIT_MARGIN` for its estimate, exceeds what
    is available."""
    return [k for k, v in p["peak_mib"].items()
            if p["available_mib"].get(k) is not None and v * FIT_MARGIN > p["available_mib"][k]]


def describe(p: dict) -> list[str]:
    """The plan as log lines: one per unit (its largest stage), then the tensors of the peak stage."""
    device = "device" in p["peak_mib"]
    lines = [f"memory plan: {p['settings']['images']} images, caches {p['settings']['cache_dtype']} on "
             f"{p['settings']['cache_device'] or 'the compute device'}; base {p['base_mib']['host']:.0f} MiB host"
             + (f", {p['base_mib'].get('device', 0):.0f} MiB device" if device else "")
             + f", calibration images {p['images']['mib']:.0f} MiB host"]
    best: dict[tuple, dict] = {}
    for r in p["stages"]:
        key = (r["phase"], r["unit"])
        if key not in best or _total(r) > _total(best[key]):
            best[key] = r
    lines.append("  unit | peak stage | cached MiB | working MiB | host MiB" + (" | device MiB" if device else ""))
    for r in best.values():
        cached = sum(h["mib"] for h in r["held"])
        lines.append(f"  {r['unit']} | {r['stage']} | {cached:.0f} | {r['working_mib']:.0f} | {r['host_mib']:.0f}"
                     + (f" | {r['device_mib']:.0f}" if device else ""))
    for k, v in p["peak_mib"].items():
        avail = p["available_mib"].get(k)
        lines.append(f"  peak {k}: {v:.0f} MiB at {p['peak_at'][k]} ({v * FIT_MARGIN:.0f} MiB with "
                     f"{FIT_MARGIN - 1:.0%} of room for the estimate); available: "
                     + ("unknown" if avail is None else f"{avail:.0f} MiB"))
    top = next(r for r in p["stages"] if _where(r) == p["peak_at"]["host"])
    for h in top["held"]:
        lines.append(f"    {h['name']}: {h['shape']} per image x {h['images']} {h['dtype']} on {h['where']}, "
                     f"{h['mib']:.0f} MiB, held for {h['lifetime']}")
    return lines


def memory_plan(gm: fx.GraphModule, phases: list[Phase], calib: torch.Tensor, ctx, *, cache_device: str | None,
                limits: dict[str, float | None]) -> dict:
    """The run's plan (`plan`) for `gm` reconstructed by `phases` on the calibration images `calib` (this
    process's share under DDP), measured against `limits` (MiB; None: what is available now), with the
    settings that would fit (`fitting`) when it does not."""
    compute = ctx.device.type
    shapes, saved = probe(gm, calib[:1].to(ctx.device))
    per_rank = len(calib) // ctx.dist.world_size
    world = ctx.dist.world_size
    image = Held("images", list(calib.shape[1:]), "float32", "cpu", "the run", len(calib))  # every rank has all
    base = {"host": max(host_rss_mib() - image.mib, 0.0)}
    available = {"host": limits.get("host") if limits.get("host") is not None else host_available_mib()}
    if compute == "cuda":
        base["device"] = torch.cuda.memory_allocated(ctx.device) / MIB
        available["device"] = (limits.get("device") if limits.get("device") is not None
                               else (torch.cuda.mem_get_info(ctx.device)[0] + torch.cuda.memory_reserved(ctx.device))
                               / MIB)
    if available["host"] is not None and limits.get("host") is None:
        available["host"] += host_rss_mib()  # what the process holds now is part of its peak
    if available["host"] is not None:  # the processes of one node share its host memory
        available["host"] /= processes_per_node(world)

    def build(images: int, cache_dtype: str, where: str | None) -> dict:
        stages = unit_stages(gm, phases, shapes, saved, images=images, batch_size=ctx.batch_size // world,
                             act_init_size=ctx.act_init_size, cache_dtype=cache_dtype,
                             cache_where=where or compute, compute=compute, reconstruct_stem=ctx.reconstruct_stem)
        stages.append(final_stage(gm, shapes, ctx.act_init_size, images))
        held = Held(image.name, image.shape, image.dtype, image.where, image.lifetime, images * world)
        return plan(stages, base=base, images_held=held, available=available, compute=compute,
                    settings={"images": images, "cache_dtype": cache_dtype, "cache_device": where,
                              "batch_size": ctx.batch_size})

    dtype = str(ctx.cache_dtype).removeprefix("torch.")
    out = build(per_rank, dtype, cache_device)
    if does_not_fit(out):
        out["fitting"] = fitting(build, per_rank, dtype, cache_device, ctx.batch_size // world, world, compute,
                                 ctx.act_init_size)
    return out


def fitting(build, images: int, dtype: str, where: str | None, batch_size: int, world_size: int,
            compute: str, act_init_size: int) -> dict[str, float]:
    """Single settings that make the plan fit, each with its planned peak (MiB on the tightest place)."""
    found = {}

    def peak(p: dict) -> float:
        return max(p["peak_mib"].values())

    if dtype == "float32":
        p = build(images, "float16", where)
        if not does_not_fit(p):
            found["calib.cache_dtype=float16"] = round(peak(p), 1)
    for kind in ("cpu", "disk") if compute == "cuda" else ("disk",):
        if where != kind:
            p = build(images, dtype, kind)
            if not does_not_fit(p):
                found[f"calib.cache_device={kind}"] = round(peak(p), 1)
    lo, hi = 0, images // batch_size  # the most whole batches of images that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if does_not_fit(build(mid * batch_size, dtype, where)):
            hi = mid - 1
        else:
            lo = mid
    if lo:
        size = lo * batch_size * world_size
        key = f"calib.size={size}" + (f" calib.act_init_size={size}" if size < act_init_size else "")
        found[key] = round(peak(build(lo * batch_size, dtype, where)), 1)
    return found


def check_fits(p: dict, dist=None) -> None:
    """One error naming the peak, what is available and the settings that fit, where the plan does not fit
    (under DDP on every process when any one's does not, so that none waits for the others)."""
    from pdq.errors import PdqError

    over = does_not_fit(p)
    if dist is not None and dist.enabled and dist.sum(float(bool(over)))[0] and not over:
        raise PdqError("the memory plan of another process does not fit; its error names the peak and the settings "
                       "that fit")
    if not over:
        return
    where = over[0]
    fits = p.get("fitting") or {}
    hint = ("; settings that fit: " + ", ".join(f"{k} (peak {v / 1024:.1f} GiB)" for k, v in fits.items())
            if fits else "; no single setting fits: combine calib.cache_dtype=float16, calib.cache_device and a "
                         "smaller calib.size")
    peak = p["peak_mib"][where]
    raise PdqError(f"the memory plan needs {peak / 1024:.1f} GiB of {where} memory at {p['peak_at'][where]} "
                   f"({peak * FIT_MARGIN / 1024:.1f} GiB with {FIT_MARGIN - 1:.0%} of room for its estimate), "
                   f"{p['available_mib'][where] / 1024:.1f} GiB is available (memory_limit_mib.{where}){hint}. "
                   "`plan_only=true` prints the plan")
