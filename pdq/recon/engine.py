"""The sequential reconstruction loop. A method is a list of `Phase`s; each phase visits the units in
order and, for each unit:

1. caches its inputs on the quantized path (earlier units quantized and hardened) and on the FP path,
   and its FP output, for the whole calibration set on the compute device (under DDP: for this rank's
   shard; every step's batch is then `batch_size / world_size` images per rank);
2. initialises its activation quantizers from the first `act_init_size` quantized-path inputs;
3. fits a `UnitReconstruction` (AdaRound variables and/or LSQ activation scales) with a Lightning
   Trainer for `iters` steps, batches and masks drawn from a generator seeded by (seed, phase, unit,
   rank), gradients all-reduced over the ranks by Lightning's DDP;
4. hardens the rounding into the weights, freezes the scales, releases the caches, and saves the
   model state atomically so that an interrupted run resumes at the next unit.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from pdq.context import RunContext, stream_seed
from pdq.io import atomic_torch_save
from pdq.quant.adaround import AdaRoundQuantizer
from pdq.quant.graph import quantize_model
from pdq.quant.observers import Observer
from pdq.quant.state import act_quantizers, calibrate_activations, full_precision, set_quant_state
from pdq.recon.dc import DCConfig, check_chunk, correct, fp_twin
from pdq.recon.module import Caches, UnitProgress, UnitReconstruction, loader
from pdq.recon.subgraph import prefix, segment, suffix
from pdq.recon.units import Unit, find_units

log = logging.getLogger("pdq")
# units are fitted in eval mode on purpose (BN is folded; nothing else behaves differently in training)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
for _msg in (r".*does not have many workers.*", r".*`IterableDataset` has `__len__` defined.*",
             r".*smaller than the logging interval.*", r".*isinstance\(treespec, LeafSpec\).*"):
    warnings.filterwarnings("ignore", message=_msg)
STATE_FILE = "recon_state.pt"


@dataclass
class Phase:
    """Switches and loss weights of one pass over the units."""
    pattern: str = "block"            # block | layer
    iters: int = 20000
    learn_rounding: bool = True       # AdaRound variables
    learn_act_scale: bool = True      # LSQ activation scales
    act_quant: bool = True            # activation quantization on while reconstructing
    drop_prob: float = 1.0            # QDrop: probability an activation element is quantized (1 = always)
    input_prob: float = 1.0           # probability a unit-input element comes from the quantized path
    rec_p: float = 2.0                # reconstruction loss exponent
    round_lr: float = 1e-3
    scale_lr: float = 4e-5
    round_optimizer: Callable | None = None   # partial optimiser for the AdaRound variables (default Adam)
    scale_optimizer: Callable | None = None   # partial optimiser for the activation scales (default Adam)
    scale_scheduler: Callable | None = None   # partial LR scheduler for the scales (default cosine to 0)
    round_weight: float = 0.01
    warmup: float = 0.2
    b_range: tuple[float, float] = (20.0, 2.0)
    rec_weight: float = 1.0           # reconstruction ("regularisation") term
    pd_weight: float = 0.0            # PD-Quant prediction-difference term (official: 1 / lambda_r = 10)
    temperature: float = 4.0          # PD softmax temperature
    pd_branch_drop: bool = True       # official: dropping stays on in the PD (quantized) half
    dc: DCConfig | dict | None = None  # Distribution Correction of the FP unit inputs

    def __post_init__(self):
        self.dc = DCConfig(**self.dc) if isinstance(self.dc, dict) else (self.dc or DCConfig())


@torch.no_grad()
def _run_batched(module: torch.nn.Module, x: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    return torch.cat([module(x[i:i + batch_size].to(device, torch.float32)).to(dtype)
                      for i in range(0, len(x), batch_size)])


class ReconstructionEngine:
    def __init__(self, gm: fx.GraphModule, calib: torch.Tensor, ctx: RunContext, act_observer: Observer):
        self.gm, self.calib, self.ctx, self.act_observer = gm, calib, ctx, act_observer
        self.local = calib[ctx.dist.shard(len(calib))]  # the images this rank caches (all of them without DDP)
        self.summaries: list[dict] = list((ctx.resume_state or {}).get("units", []))
        self.done: set[tuple[int, int]] = {(s["phase"], s["index"]) for s in self.summaries}
        self.step_offset = sum(s["iters"] for s in self.summaries)
        if ctx.fp_model is None:
            raise ValueError("reconstruction needs the float model (RunContext.fp_model)")
        self._logits: torch.Tensor | None = None
        self._fp_graph: fx.GraphModule | None = None
        self._fp_folded: fx.GraphModule | None = None

    def logits(self) -> torch.Tensor:
        """FP network logits on the (uncorrected) calibration images, computed once."""
        if self._logits is None:
            self._logits = _run_batched(self.fp_folded(), self.local, self.ctx.batch_size, self.ctx.device,
                                        torch.float32)
        return self._logits

    def fp_graph(self) -> fx.GraphModule:
        """The unfolded FP model as a graph (DC needs its BatchNorms)."""
        if self._fp_graph is None:
            self._fp_graph = fx.symbolic_trace(self.ctx.fp_model).to(self.ctx.device).eval()
        return self._fp_graph

    def fp_folded(self) -> fx.GraphModule:
        """The FP path: the BN-folded float model with `gm`'s node names and every quantizer off. `gm` under
        `full_precision` is not it: hardening writes the rounded weights of finished units into `gm`, and
        the FP inputs and targets of later units must come from the original weights (as in the official
        codes, which keep `org_weight`)."""
        if self._fp_folded is None:
            fp = quantize_model(self.ctx.fp_model).to(self.ctx.device).eval()
            set_quant_state(fp, weight=False, act=False)
            self._fp_folded = fp
        return self._fp_folded

    def fp_pieces(self, unit: Unit) -> tuple[fx.GraphModule, fx.GraphModule]:
        """(prefix, segment) of the FP path for `unit`, matched to `gm`'s unit by node name."""
        fp = self.fp_folded()
        nodes = {n.name: n for n in fp.graph.nodes}
        twin = Unit(unit.name, unit.kind, [nodes[n.name] for n in unit.nodes], nodes[unit.input.name],
                    nodes[unit.output.name])
        return prefix(fp, twin.input), segment(fp, twin)

    def run(self, phases: list[Phase]) -> list[dict]:
        for phase in phases:
            check_chunk(phase.dc, len(self.local), self.ctx.dist)
        for p, phase in enumerate(phases):
            units = find_units(self.gm, phase.pattern)
            for q in act_quantizers(self.gm):
                q.enabled = phase.act_quant
            for i, unit in enumerate(units):
                if (p, i) in self.done or (i == 0 and not self.ctx.reconstruct_stem):
                    continue
                self.summaries.append(self.reconstruct(p, i, len(units), unit, phase))
                self.save(p, i)
        return self.summaries

    def caches(self, unit: Unit, phase: Phase) -> tuple[Caches, dict]:
        ctx, gm = self.ctx, self.gm
        pre = prefix(gm, unit.input)
        x_q = x_fp = None
        if phase.input_prob > 0 or phase.pd_weight > 0:
            if phase.act_quant:
                ctx.dist.broadcast_quantizers(calibrate_activations(
                    pre, self.calib[: ctx.act_init_size].to(ctx.device), self.act_observer, only_uninitialized=True))
            x_q = _run_batched(pre, self.local, ctx.batch_size, ctx.device, ctx.cache_dtype)
        dc_info: dict = {}
        fp_pre, fp_seg = self.fp_pieces(unit)
        x_fp_full = _run_batched(fp_pre, self.local, ctx.batch_size, ctx.device, ctx.cache_dtype)
        if phase.dc.enabled:
            t_dc = time.time()
            twin, bns = fp_twin(self.fp_graph(), gm, unit)
            x_fp_full, dc_info = correct(twin, bns, x_fp_full, phase.dc, desc=f"DC {unit.name}", dist=ctx.dist)
            dc_info["dc_s"] = round(time.time() - t_dc, 3)
        y_fp = _run_batched(fp_seg, x_fp_full, ctx.batch_size, ctx.device, ctx.cache_dtype)
        if phase.input_prob < 1:
            x_fp = x_fp_full
        logits = self.logits() if phase.pd_weight > 0 else None
        return Caches(x_q, x_fp, y_fp, logits), dc_info

    def reconstruct(self, p: int, i: int, n_units: int, unit: Unit, phase: Phase) -> dict:
        ctx, gm = self.ctx, self.gm
        t0 = time.time()
        seg = segment(gm, unit)
        caches, dc_info = self.caches(unit, phase)
        t_cache = time.time()
        prefix_name = f"p{p}_u{i:02d}_{unit.name}" if p else f"u{i:02d}_{unit.name}"
        if "dc_loss_before" in dc_info and ctx.logger is not None:  # logged at the unit's first step
            ctx.logger.log_metrics({f"{prefix_name}/{k}": v for k, v in dc_info.items() if k.startswith("dc_loss")},
                                   step=self.step_offset)
        acts = [gm.get_submodule(n) for n in unit.act_quants(gm)]
        if phase.act_quant:  # the first act_init_size images of the whole set, gathered from the ranks
            x_init = ctx.dist.head(caches.x_q if caches.x_q is not None else caches.x_fp, ctx.act_init_size)
            ctx.dist.broadcast_quantizers(calibrate_activations(seg, x_init.float(), self.act_observer,
                                                                only_uninitialized=True))
        t_init = time.time()

        layers = [gm.get_submodule(n) for n in unit.layers(gm)]
        base_quantizers = [layer.weight_quant for layer in layers]
        adarounds = []
        if phase.learn_rounding:
            for layer in layers:
                if layer.weight_quant.active:
                    layer.weight_quant = AdaRoundQuantizer(layer.weight_quant, layer.weight)
                    adarounds.append(layer.weight_quant)
        scales = [q.learn_scale() for q in acts if q.active] if (phase.learn_act_scale and phase.act_quant) else []
        rank = ctx.dist.rank
        gen = torch.Generator().manual_seed(stream_seed(ctx.seed, p, i, 2 * rank))
        mask_gen = torch.Generator(device=ctx.device).manual_seed(stream_seed(ctx.seed, p, i, 2 * rank + 1))
        for q in acts:
            q.drop_prob, q.generator = phase.drop_prob, mask_gen
        module = UnitReconstruction(
            seg, caches, iters=phase.iters, input_prob=phase.input_prob, rec_p=phase.rec_p, adarounds=adarounds,
            scales=scales, round_lr=phase.round_lr, scale_lr=phase.scale_lr, round_weight=phase.round_weight,
            warmup=phase.warmup, b_range=tuple(phase.b_range), mask_generator=mask_gen, log_prefix=prefix_name,
            step_offset=self.step_offset, log_every=ctx.log_every, rec_weight=phase.rec_weight,
            pd_weight=phase.pd_weight, temperature=phase.temperature, pd_branch_drop=phase.pd_branch_drop,
            suffix=suffix(gm, unit.output) if phase.pd_weight > 0 else None, drop_quantizers=tuple(acts),
            round_optimizer=phase.round_optimizer, scale_optimizer=phase.scale_optimizer,
            scale_scheduler=phase.scale_scheduler)
        trainable = bool(adarounds or scales)
        later = module.suffix if module.suffix is not None else torch.nn.Identity()
        try:
            if trainable and phase.iters > 0:
                # one epoch over exactly `iters` index batches (max_steps would count every optimizer's step)
                trainer = ctx.trainer(max_epochs=1, logger=ctx.logger or False, enable_checkpointing=False,
                                      enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                      limit_val_batches=0, use_distributed_sampler=False,
                                      callbacks=[UnitProgress(f"unit {i + 1}/{n_units} {unit.name}", phase.iters)])
                with full_precision(later):  # the rest of the network stays FP (spec §5.2)
                    batches = loader(len(caches), ctx.batch_size // ctx.dist.world_size, phase.iters, gen)
                    trainer.fit(module, train_dataloaders=batches)
        finally:
            for layer, base, ada in zip(layers, base_quantizers, [layer.weight_quant for layer in layers]):
                if isinstance(ada, AdaRoundQuantizer):
                    ada.harden()
                    with torch.no_grad():
                        layer.weight.copy_(ada(layer.weight))  # hard-rounded grid values: idempotent
                layer.weight_quant = base
            for q in acts:
                q.freeze_scale()
                q.drop_prob, q.generator = 1.0, None
        t_end = time.time()
        final = {k: round(v, 6) for k, v in module.last.items()}
        self.step_offset += phase.iters if trainable else 0
        log.info("unit %d/%d %s: %s (cache %.1fs, act init %.1fs, fit %.1fs)", i + 1, n_units, unit.name,
                 " ".join(f"{k}={v:.4g}" for k, v in final.items()), t_cache - t0, t_init - t_cache, t_end - t_init)
        return {"name": unit.name, "phase": p, "index": i, "kind": unit.kind, "iters": phase.iters if trainable else 0,
                "seconds": round(t_end - t0, 3), "cache_s": round(t_cache - t0, 3),
                "act_init_s": round(t_init - t_cache, 3), "fit_s": round(t_end - t_init, 3), **final, **dc_info}

    def save(self, p: int, i: int) -> None:
        if self.ctx.out_dir is not None and self.ctx.dist.main:
            atomic_torch_save({"phase": p, "index": i, "units": self.summaries, "state_dict": self.gm.state_dict(),
                               "fingerprint": self.ctx.fingerprint}, Path(self.ctx.out_dir) / STATE_FILE)
