"""The sequential reconstruction loop. A method is a list of `Phase`s; each phase visits the units in
order and, for each unit, with one `UnitWork` that carries the unit through the three steps:

1. `prepare`: caches its inputs on the quantized path (earlier units quantized and hardened) and on the
   FP path (DC-corrected when DC is on), and its FP output, for the whole calibration set on the compute
   device (under DDP: for this rank's shard; every step's batch is then `batch_size / world_size` images
   per rank), and initialises its activation quantizers from the first `act_init_size` inputs. Inputs
   follow from the previous unit's where units form a chain (`pdq.recon.inputs`); DC results come from
   `paths.cache_dir` when an earlier run computed them (`pdq.recon.dc.DCStore`);
2. `fit`: with the phase's switches on (AdaRound, learned scales, QDrop dropping, the FP rest of the
   network), fits a `UnitReconstruction` with a Lightning Trainer for `iters` steps, batches and masks
   drawn from generators seeded by (seed, phase, unit, rank), gradients all-reduced over the ranks by
   Lightning's DDP; leaving the switches hardens the rounding into the weights and freezes the scales;
3. `finish`: summarises the unit; `run` then saves the model state atomically, so that an interrupted
   run resumes at the next unit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from pdq.context import RunContext, stream_seed
from pdq.io import atomic_torch_save
from pdq.quant.graph import ancestors, backend_of, is_act_quant, quantize_model
from pdq.quant.observers import Observer
from pdq.quant.state import (
    act_quantizers,
    adaround,
    calibrate_activations,
    dropping,
    full_precision,
    learned_scales,
    set_quant_state,
)
from pdq.recon.dc import DCStore, check_chunk, correct, fp_twin
from pdq.recon.inputs import UnitInputs
from pdq.recon.module import Caches, UnitProgress, UnitReconstruction, loader
from pdq.recon.phase import DCConfig, Phase
from pdq.recon.steps import allocate_steps, unit_sensitivity
from pdq.recon.store import CacheStore, dim_order, empty_in_order
from pdq.recon.subgraph import prefix, segment, suffix
from pdq.recon.units import Unit, enclosing
from pdq.resume import STATE_FILE

log = logging.getLogger("pdq")
#: Lightning's warnings that do not apply to a unit's fit, silenced during the fit only: units are fitted in
#: eval mode on purpose (BN is folded), the index batches are an in-memory iterable, one epoch is short
FIT_WARNINGS = (r".*module\(s\) in eval mode.*", r".*does not have many workers.*",
                r".*`IterableDataset` has `__len__` defined.*", r".*smaller than the logging interval.*",
                r".*isinstance\(treespec, LeafSpec\).*")


@torch.no_grad()
def _run_batched(module: torch.nn.Module, xs: tuple[torch.Tensor, ...], batch_size: int, device, dtype,
                 memory_format: torch.memory_format = torch.preserve_format, empty=None) -> torch.Tensor:
    """`module` over the rows of the tensors `xs` (its inputs), `batch_size` rows at a time in float32, written
    into one tensor of `dtype` from `empty(shape, dtype, dim order)` (default: on `device`), in the layout of
    the batches' outputs."""
    def batch(x: torch.Tensor, i: int) -> torch.Tensor:
        fmt = memory_format if x.dim() == 4 else torch.preserve_format  # channels-last is for 4-D tensors only
        return x[i:i + batch_size].to(device, torch.float32, memory_format=fmt)

    out, n = None, len(xs[0])
    for i in range(0, n, batch_size):
        y = module(*(batch(x, i) for x in xs))
        if out is None:
            shape, order = (n, *y.shape[1:]), dim_order(y)
            out = empty(shape, dtype, order) if empty is not None else empty_in_order(shape, dtype, order, device)
        out[i:i + len(y)] = y
    return out


@contextlib.contextmanager
def memory_format(module: torch.nn.Module, fmt: torch.memory_format):
    """`module`'s 4-D parameters and buffers in `fmt` inside the block, back in the default layout after."""
    module.to(memory_format=fmt)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@dataclass
class UnitWork:
    """One unit's reconstruction in one phase, created once per unit and passed whole: `prepare` fills in
    its segment, caches, activation quantizers and DC's results, `fit` its last loss terms and steps, and
    `finish` summarises it."""
    phase_index: int
    index: int                  # the unit's position among the phase's units
    count: int                  # the phase's units
    unit: Unit
    phase: Phase
    outer: Unit | None          # the block holding the unit's output when that output is inside a branch (PD)
    seg: fx.GraphModule | None = None   # the unit as a graph module (`segment`)
    caches: Caches | None = None
    acts: list[torch.nn.Module] = field(default_factory=list)  # the unit's activation quantizers
    dc_info: dict = field(default_factory=dict)                # DC's losses, whether cached, its seconds
    last: dict[str, float] = field(default_factory=dict)       # the loss terms of the last step
    iters: int = 0              # steps fitted (0: nothing to learn)
    sensitivity: float | None = None  # the PD loss of quantizing the unit alone (`method.steps=adaptive`)
    times: dict[str, float] = field(default_factory=dict)      # seconds per stage (cache_s, act_init_s, fit_s)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self._lap = self.started

    @property
    def name(self) -> str:
        """The prefix of the unit's metrics: u03_layer1.1 (p1_u03_layer1.1 in a later phase)."""
        name = f"u{self.index:02d}_{self.unit.name}"
        return f"p{self.phase_index}_{name}" if self.phase_index else name

    @property
    def desc(self) -> str:
        return f"unit {self.index + 1}/{self.count} {self.unit.name}"

    def lap(self, stage: str) -> None:
        """The seconds since the previous lap (or since the start) are `stage`'s."""
        now = time.time()
        self.times[stage], self._lap = now - self._lap, now


class ReconstructionEngine:
    def __init__(self, gm: fx.GraphModule, calib: torch.Tensor, ctx: RunContext, act_observer: Observer):
        self.gm, self.calib, self.ctx, self.act_observer = gm, calib, ctx, act_observer
        self.local = calib[ctx.dist.shard(len(calib))]  # the images this rank caches (all of them without DDP)
        #: channels-last for image batches when `calib.channels_last` (faster convolutions), else as they come
        self.fmt = torch.channels_last if ctx.channels_last and calib.dim() == 4 else torch.preserve_format
        self.summaries: list[dict] = list((ctx.resume_state or {}).get("units", []))
        self.done: set[tuple[int, int]] = {(s["phase"], s["index"]) for s in self.summaries}
        self.step_offset = sum(s["iters"] for s in self.summaries)
        #: per phase (as a string key), the units' sensitivities and steps under `method.steps=adaptive`
        self.step_plans: dict[str, dict] = dict((ctx.resume_state or {}).get("step_plans", {}))
        if ctx.fp_model is None:
            raise ValueError("reconstruction needs the float model (RunContext.fp_model)")
        self._logits: torch.Tensor | None = None
        self._fp_graph: fx.GraphModule | None = None
        self._fp_folded: fx.GraphModule | None = None
        self._dc_store: DCStore | None = None
        self._stem: weakref.ref | None = None
        self.inputs: dict[str, UnitInputs] = {}  # per path, for the phase in progress
        self.store = ctx.store if ctx.store is not None else CacheStore(None, ctx.device)  # calib.cache_device

    def logits(self) -> torch.Tensor:
        """FP network logits on the (uncorrected) calibration images, computed once."""
        if self._logits is None:
            self._logits = _run_batched(self.fp_folded(), (self.local,), self.ctx.batch_size, self.ctx.device,
                                        torch.float32, self.fmt)
        return self._logits

    def fp_graph(self) -> fx.GraphModule:
        """The unfolded FP model as a graph (DC needs its BatchNorms): a copy without parameter gradients."""
        if self._fp_graph is None:
            self._fp_graph = fx.symbolic_trace(copy.deepcopy(self.ctx.fp_model)).to(self.ctx.device).eval()
            self._fp_graph.requires_grad_(False).to(memory_format=self.fmt)
        return self._fp_graph

    def fp_folded(self) -> fx.GraphModule:
        """The FP path: the BN-folded float model with `gm`'s node names and every quantizer off. `gm` under
        `full_precision` is not it: hardening writes the rounded weights of finished units into `gm`, and
        the FP inputs and targets of later units must come from the original weights (as in the official
        codes, which keep `org_weight`)."""
        if self._fp_folded is None:
            fp = quantize_model(self.ctx.fp_model, backend=backend_of(self.gm)).to(self.ctx.device).eval()
            set_quant_state(fp, weight=False, act=False)
            self._fp_folded = fp.to(memory_format=self.fmt)
        return self._fp_folded

    def fp_segment(self, unit: Unit) -> fx.GraphModule:
        """`unit` on the FP path, matched to `gm`'s unit by node name."""
        fp = self.fp_folded()
        nodes = {n.name: n for n in fp.graph.nodes}
        return segment(fp, Unit(unit.name, unit.kind, [nodes[n.name] for n in unit.nodes], nodes[unit.input.name],
                                nodes[unit.output.name]))

    def dc_store(self) -> DCStore | None:
        """The DC cache (`paths.cache_dir`; None: no cache), keyed on this engine's float model and images."""
        if self._dc_store is None and self.ctx.cache_dir is not None:
            ctx = self.ctx
            self._dc_store = DCStore(ctx.cache_dir, ctx.fp_model, self.calib, batch_size=ctx.batch_size,
                                     dtype=ctx.cache_dtype, device=ctx.device, dist=ctx.dist, store=self.store)
        return self._dc_store

    def run_batched(self, module: torch.nn.Module, *xs: torch.Tensor) -> torch.Tensor:
        """`module` over cached tensors (or the images), into a cache (`calib.cache_device`)."""
        return _run_batched(module, xs, self.ctx.batch_size, self.ctx.device, self.ctx.cache_dtype, self.fmt,
                            self.store.empty)

    def run(self, phases: list[Phase]) -> list[dict]:
        with memory_format(self.gm, self.fmt):
            return self._run(phases)

    def _run(self, phases: list[Phase]) -> list[dict]:
        for phase in phases:
            check_chunk(phase.dc, len(self.local), self.ctx.dist)
        for p, phase in enumerate(phases):
            units = phase.units(self.gm)
            outers = enclosing(self.gm, units) if phase.uses_pd else [None] * len(units)
            for q in act_quantizers(self.gm):
                q.enabled = phase.act_quant
            self.begin_phase()
            plan = self.step_plan(p, phase, units)
            for i, (unit, outer) in enumerate(zip(units, outers)):
                if (p, i) in self.done or not self.fits(i):
                    continue
                steps = plan["steps"][i] if plan else phase.iters
                work = UnitWork(p, i, len(units), unit, phase.with_steps(steps) if plan else phase, outer,
                                sensitivity=plan["sensitivity"][i] if plan else None)
                self.prepare(work)
                self.fit(work)
                self.summaries.append(self.finish(work))
                self.save(p, i)
        return self.summaries

    def fits(self, index: int) -> bool:
        """Whether the unit at `index` is fitted (the first only with `reconstruct_stem`)."""
        return index > 0 or self.ctx.reconstruct_stem

    def step_plan(self, p: int, phase: Phase, units: list[Unit]) -> dict | None:
        """{"sensitivity": [...], "steps": [...]} per unit of the phase (0 steps for a unit that is not fitted),
        made before its first unit and kept in the saved state (a resumed run fits with the same plan): under
        `method.steps=adaptive` from each unit's measured sensitivity, under `uniform` the same steps for every unit
        (no sensitivity); None where every unit gets `iters` steps."""
        if phase.iters == 0 or (phase.steps == "uniform" and phase.step_budget == 1):
            return None
        if str(p) not in self.step_plans:
            ctx = self.ctx
            fitted = [i for i in range(len(units)) if self.fits(i)]
            sens = [None] * len(fitted)
            if phase.steps == "adaptive":
                images = self.calib[: ctx.act_init_size].to(ctx.device)
                sens = unit_sensitivity(self.gm, [units[i] for i in fitted], images, act_quant=phase.act_quant,
                                        act_observer=self.act_observer, batch_size=ctx.batch_size,
                                        temperature=phase.temperature)
                counts = allocate_steps(sens, phase.iters, phase.step_budget, phase.step_bounds)
            else:
                counts = [max(1, round(phase.step_budget * phase.iters))] * len(fitted)
            sens, steps = dict(zip(fitted, sens)), dict(zip(fitted, counts))
            plan = {"sensitivity": [sens.get(i) for i in range(len(units))],
                    "steps": [steps.get(i, 0) for i in range(len(units))]}
            self.step_plans[str(p)] = ctx.dist.broadcast(plan)  # one plan on every rank
            log.info("steps (method.steps=%s, method.step_budget=%g, %d in all): %s", phase.steps, phase.step_budget,
                     sum(plan["steps"]), ", ".join(f"{u.name} {n}" for u, n in zip(units, plan["steps"]) if n))
        return self.step_plans[str(p)]

    def begin_phase(self) -> None:
        """Fresh incremental caches of the unit inputs on the quantized path, on the FP path, and of the
        blocks enclosing PD layer units (a phase visits the units from the first again)."""
        chain = self.ctx.cache_dtype == torch.float32
        self.inputs = {path: UnitInputs(gm, self.local, self.run_batched, self.stem_input, chain)
                       for path, gm in (("q", self.gm), ("fp", self.fp_folded()), ("outer", self.gm))}

    def stem_input(self) -> torch.Tensor:
        """The calibration images as a cache (cache dtype, layout and device): the input of the first unit on
        every path, one tensor while any path holds it (a weak reference: it goes with the first unit)."""
        stem = self._stem() if self._stem is not None else None
        if stem is None:
            stem = self.run_batched(torch.nn.Identity(), self.local)
            self._stem = weakref.ref(stem)
        return stem

    def cache(self, work: UnitWork) -> None:
        """The unit's caches (`work.caches`) and, when DC is on, DC's results (`work.dc_info`)."""
        unit, phase = work.unit, work.phase
        x_q = None
        if phase.input_prob > 0 or phase.uses_pd:
            if phase.act_quant:
                self.calibrate_upstream(unit.input)
            x_q = self.inputs["q"](unit.input.name)
        x_fp = self.inputs["fp"](unit.input.name)
        if phase.dc.enabled:
            x_fp, work.dc_info = self.correct(unit, phase.dc, x_fp)
        y_fp = self.run_batched(self.fp_segment(unit), x_fp)
        logits = self.logits() if phase.uses_pd else None
        rest_input = None if work.outer is None else self.inputs["outer"](work.outer.input.name)
        work.caches = Caches(x_q, x_fp if phase.input_prob < 1 else None, y_fp, logits, rest_input, self.ctx.device)

    def calibrate_upstream(self, node: fx.Node) -> None:
        """Activation quantizers on the way to `node` that no unit initialised (glue between units), from the
        first `act_init_size` images through the quantized prefix, in forward order."""
        gm, ctx = self.gm, self.ctx
        if any(is_act_quant(gm, n) and gm.get_submodule(n.target).active
               and not bool(gm.get_submodule(n.target).initialized) for n in ancestors(node) | {node}):
            ctx.dist.broadcast_quantizers(calibrate_activations(
                prefix(gm, node), self.calib[: ctx.act_init_size].to(ctx.device, memory_format=self.fmt),
                self.act_observer, only_uninitialized=True))

    def correct(self, unit: Unit, cfg: DCConfig, x_fp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The unit's DC-corrected FP inputs and DC's losses: from the DC cache when an earlier run with the
        same float model, images, unit and settings computed them, else computed (and stored)."""
        t_dc = time.time()
        twin, bns = fp_twin(self.fp_graph(), self.gm, unit)
        if not bns:  # nothing to correct
            return x_fp, {"dc_s": round(time.time() - t_dc, 3)}
        store = self.dc_store()
        found = store.entry(unit, cfg) if store is not None else None
        hit = store.load(found, len(x_fp)) if store is not None else None
        if hit is not None:
            x_fp, info = hit
            log.info("DC %s: from the cache (%s)", unit.name, found)
        else:
            x_fp, info = correct(twin, bns, x_fp, cfg, desc=f"DC {unit.name}", dist=self.ctx.dist,
                                 batch_size=self.ctx.batch_size, device=self.ctx.device)
            x_fp = self.store.put(x_fp)
            if store is not None:
                store.save(found, x_fp, info)
        return x_fp, {**info, "dc_cached": hit is not None, "dc_s": round(time.time() - t_dc, 3)}

    def prepare(self, work: UnitWork) -> None:
        """The unit's segment, its caches (DC-corrected FP inputs when DC is on; DC's losses logged at the
        unit's first step) and its activation quantizers (initialised when the phase quantizes activations)."""
        work.seg = segment(self.gm, work.unit)
        self.cache(work)
        if work.dc_info and self.ctx.logger is not None:
            self.ctx.logger.log_metrics({f"{work.name}/{k}": v for k, v in work.dc_info.items()
                                         if k.startswith("dc_loss")}, step=self.step_offset + 1)
        work.lap("cache_s")
        work.acts = [self.gm.get_submodule(n) for n in work.unit.act_quants(self.gm)]
        if work.phase.act_quant:
            self.init_activations(work.seg, work.caches)
        work.lap("act_init_s")

    def init_activations(self, seg: fx.GraphModule, caches: Caches) -> None:
        """The unit's uncalibrated activation quantizers, from the first `act_init_size` images of the whole
        set (gathered from the ranks), on the quantized path where the unit has it."""
        ctx = self.ctx
        x = caches.x_q if caches.x_q is not None else caches.x_fp
        x_init = ctx.dist.head(x[:ctx.act_init_size].to(ctx.device), ctx.act_init_size)
        ctx.dist.broadcast_quantizers(calibrate_activations(seg, x_init.float(), self.act_observer,
                                                            only_uninitialized=True))

    def fit(self, work: UnitWork) -> None:
        """Fit what the phase learns on the unit with a Lightning Trainer, then harden and freeze it; keeps the
        last loss terms and the steps fitted (0 when there is nothing to learn). Batches and masks come from
        generators seeded by (seed, phase, unit, rank)."""
        ctx, gm, phase, unit, acts = self.ctx, self.gm, work.phase, work.unit, work.acts
        names = unit.layers(gm)
        layers = [gm.get_submodule(n) for n in names]
        rank, p, i = ctx.dist.rank, work.phase_index, work.index
        gen = torch.Generator().manual_seed(stream_seed(ctx.seed, p, i, 2 * rank))
        mask_gen = torch.Generator(device=ctx.device).manual_seed(stream_seed(ctx.seed, p, i, 2 * rank + 1))
        rest = suffix(gm, unit.output, work.outer and work.outer.input) if phase.uses_pd else None
        with (adaround(layers if phase.learn_rounding else [], phase.learns_weight_scales, names) as adarounds,
              learned_scales(acts if phase.learns_scales else []) as scales,
              dropping(acts, phase.drop_prob, mask_gen),
              full_precision(rest if rest is not None else torch.nn.Identity())):  # the rest stays FP (spec §5.2)
            module = UnitReconstruction(work.seg, work.caches, phase, adarounds=adarounds, scales=scales,
                                        mask_generator=mask_gen, log_prefix=work.name, step_offset=self.step_offset,
                                        suffix=rest, drop_quantizers=tuple(acts))
            trained = bool(adarounds or scales)
            if trained and phase.iters > 0:
                # one epoch over exactly `iters` index batches (max_steps would count every optimizer's step)
                trainer = ctx.trainer(max_epochs=1, logger=ctx.logger or False, enable_checkpointing=False,
                                      enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                      limit_val_batches=0, use_distributed_sampler=False,
                                      callbacks=[UnitProgress(work.desc, phase.iters, ctx.dist.progress_disable)])
                batches = loader(len(work.caches), ctx.batch_size // ctx.dist.world_size, phase.iters, gen)
                with warnings.catch_warnings():
                    for message in FIT_WARNINGS:
                        warnings.filterwarnings("ignore", message=message)
                    trainer.fit(module, train_dataloaders=batches)
        work.last, work.iters = module.last, phase.iters if trained else 0
        module.caches = None  # the trainer's reference cycles keep the module until a garbage collection
        work.lap("fit_s")

    def finish(self, work: UnitWork) -> dict:
        """Advance the global step axis past the unit, log its line, and return its summary."""
        final = {k: round(v, 6) for k, v in work.last.items()}
        times = {"seconds": time.time() - work.started, **work.times}
        self.step_offset += work.iters
        log.info("unit %d/%d %s: %s (cache %.1fs, act init %.1fs, fit %.1fs)", work.index + 1, work.count,
                 work.unit.name, " ".join(f"{k}={v:.4g}" for k, v in final.items()), times["cache_s"],
                 times["act_init_s"], times["fit_s"])
        plan = {} if work.sensitivity is None else {"sensitivity": work.sensitivity}
        return {"name": work.unit.name, "phase": work.phase_index, "index": work.index, "kind": work.unit.kind,
                "iters": work.iters, **plan, **{k: round(v, 3) for k, v in times.items()}, **final,
                **work.dc_info}

    def save(self, p: int, i: int) -> None:
        if self.ctx.out_dir is not None and self.ctx.dist.main:
            atomic_torch_save({"phase": p, "index": i, "units": self.summaries, "state_dict": self.gm.state_dict(),
                               "step_plans": self.step_plans, "fingerprint": self.ctx.fingerprint},
                              Path(self.ctx.out_dir) / STATE_FILE)
            log.info("saved %s after phase %d unit %d (resume=%s continues from here)", STATE_FILE, p, i,
                     self.ctx.out_dir)
