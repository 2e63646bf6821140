"""One unit's optimisation as a LightningModule, its caches, its index batches and its progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pdq.quant.adaround import AdaRoundQuantizer, soft_rounding
from pdq.quant.functional import bernoulli_mask, is_channels_last
from pdq.quant.state import dropping
from pdq.recon.losses import RoundingRegularizer, prediction_difference, reconstruction_loss
from pdq.recon.phase import Phase


@dataclass
class Caches:
    """Per-unit tensors over the whole calibration set, where `calib.cache_device` puts them
    (`pdq.recon.store`); `device` is the compute device, which `rows` brings each batch to."""
    x_q: torch.Tensor | None            # unit input on the quantized path
    x_fp: torch.Tensor | None           # unit input on the FP path (DC-corrected when DC is on)
    y_fp: torch.Tensor                  # FP unit output on that input (target)
    logits: torch.Tensor | None = None  # FP network logits on the calibration images (PD loss)
    rest_input: torch.Tensor | None = None  # quantized-path input of the enclosing unit, when the unit's
    #                                         output is inside a branch (the FP rest reads it too)
    device: torch.device | None = None  # the compute device (None: where the caches are)

    def __len__(self) -> int:
        return len(self.y_fp)

    def rows(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of cache `name` on the compute device, in float32 (caches may be float16/bfloat16; the
        unit computes in float32): `index_select` over a row-major view, several times faster on a CPU than
        `t[idx]` (which gathers element by element), for channels-last caches too. Rows of a cache in host
        memory are gathered there, into page-locked memory when the compute device is a GPU, and copied
        asynchronously."""
        t = getattr(self, name)
        nhwc = is_channels_last(t)
        src = t.permute(0, 2, 3, 1) if nhwc else t
        device = self.device or src.device
        out = None
        if src.device != device and device.type == "cuda":
            out = torch.empty((len(idx), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
        picked = torch.index_select(src, 0, idx.to(src.device), out=out).to(device, non_blocking=True)
        return (picked.permute(0, 3, 1, 2) if nhwc else picked).float()


class IndexBatches(IterableDataset):
    """`steps` batches of calibration indices, drawn with replacement from a seeded generator."""

    def __init__(self, n: int, batch_size: int, steps: int, generator: torch.Generator):
        self.n, self.batch_size, self.steps, self.generator = n, batch_size, steps, generator

    def __iter__(self):
        for _ in range(self.steps):
            yield torch.randint(0, self.n, (self.batch_size,), generator=self.generator)

    def __len__(self) -> int:
        return self.steps


def loader(n: int, batch_size: int, steps: int, generator: torch.Generator) -> DataLoader:
    return DataLoader(IndexBatches(n, batch_size, steps, generator), batch_size=None)


class UnitReconstruction(L.LightningModule):
    """Fits one unit under one `Phase`: manual optimisation, one backward per step, the loss terms of
    `pdq.recon.losses` weighted by the phase. `adarounds` / `scales` are what the phase learns on this
    unit; `drop_quantizers` are the unit's activation quantizers (QDrop); `suffix` is the FP rest of the
    network (PD term). The loss terms reach the host (`last`, as Python floats) only on the steps that log
    them (every `trainer.log_every_n_steps` steps) and on the last step, whose terms are the unit's summary: a
    float read per term per step would wait for a GPU every step."""

    def __init__(self, unit: nn.Module, caches: Caches, phase: Phase, *, adarounds: list[AdaRoundQuantizer],
                 scales: list[nn.Parameter], mask_generator: torch.Generator, log_prefix: str, step_offset: int,
                 suffix: nn.Module | None = None, drop_quantizers: tuple = ()):
        super().__init__()
        if phase.uses_pd and suffix is None:
            raise ValueError("the PD term needs the FP rest of the network (suffix)")
        self.unit, self.caches, self.phase = unit, caches, phase
        self.adarounds = nn.ModuleList(adarounds)
        self.scales = nn.ParameterList(scales)
        self.suffix, self.drop_quantizers = suffix, drop_quantizers
        self.regularizer = RoundingRegularizer(phase.iters, phase.warmup, phase.b_range)
        self.mask_generator = mask_generator
        self.log_prefix, self.step_offset = log_prefix, step_offset
        self.automatic_optimization = False
        self.t = 0  # finished steps; the step in progress is t + 1
        self.last: dict[str, float] = {}  # the loss terms of the latest step that read them (`reads_losses`)

    def configure_optimizers(self):
        """The phase's partial optimisers (and the scales' LR scheduler) over what this unit learns; what each
        learns (round, scale: the activations', weight_scale) goes into `optimizer_names`, for the lr logs."""
        opts, scheds, ph = [], [], self.phase
        self.optimizer_names = []
        for name, params, make in (("round", [q.alpha for q in self.adarounds], ph.round_optimizer),
                                   ("scale", list(self.scales), ph.scale_optimizer),
                                   ("weight_scale", [q.scale for q in self.adarounds if q.learns_scale],
                                    ph.weight_scale_optimizer)):
            if params:
                opts.append(make(params))
                self.optimizer_names.append(name)
                if name != "round" and ph.scale_scheduler is not None:
                    scheds.append(ph.scale_scheduler(opts[-1]))
        return opts, scheds

    def unit_input(self, idx: torch.Tensor, x_q: torch.Tensor | None = None) -> torch.Tensor:
        """The unit input of a batch; `x_q`: the batch's quantized-path input, when the caller has gathered it
        already."""
        c, input_prob = self.caches, self.phase.input_prob
        if input_prob <= 0.0:
            return c.rows("x_fp", idx)
        x_q = c.rows("x_q", idx) if x_q is None else x_q
        if input_prob >= 1.0:
            return x_q
        mask = bernoulli_mask(x_q, input_prob, self.mask_generator)
        return torch.lerp(c.rows("x_fp", idx), x_q, mask, out=mask)  # into the mask: one buffer fewer

    def outputs(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The unit's output on the batch's (mixed) input, for the reconstruction term, and on its quantized
        input, for the PD term; None where the phase has no such term."""
        ph, c = self.phase, self.caches
        out = out_q = None
        if ph.uses_pd and ph.pd_branch_drop and ph.rec_weight > 0:
            # PD-Quant: one forward of [mixed half ; quantized half], dropping on in both (spec §5.2)
            x_q = c.rows("x_q", idx)
            out, out_q = self.unit(torch.cat([self.unit_input(idx, x_q), x_q])).split(len(idx))
        else:
            if ph.rec_weight > 0:
                out = self.unit(self.unit_input(idx))
            if ph.uses_pd:
                x_q = c.rows("x_q", idx)
                if ph.pd_branch_drop:
                    out_q = self.unit(x_q)
                else:
                    with dropping(self.drop_quantizers, 1.0, None):
                        out_q = self.unit(x_q)
        return out, out_q

    def losses(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term as it enters the total: rec_weight * L_rec + pd_weight * L_PD + round_weight * f_reg."""
        ph, c = self.phase, self.caches
        terms: dict[str, torch.Tensor] = {}
        with soft_rounding(list(self.adarounds)) as hs:  # h(V) of the latest forward, for f_reg
            out, out_q = self.outputs(idx)
        if out is not None:
            terms["rec_loss"] = ph.rec_weight * reconstruction_loss(out, c.rows("y_fp", idx), ph.rec_p)
        if ph.uses_pd:
            rest = (out_q,) if c.rest_input is None else (out_q, c.rows("rest_input", idx))
            terms["pd_loss"] = ph.pd_weight * prediction_difference(self.suffix(*rest), c.rows("logits", idx),
                                                                    ph.temperature)
        if len(self.adarounds):
            reg = self.regularizer(hs, self.t + 1)  # steps count from 1
            ref = out if out is not None else out_q
            terms["round_loss"] = ph.round_weight * reg if reg is not None else ref.new_zeros(())
        terms["loss"] = sum(terms.values())
        return terms

    def reads_losses(self) -> bool:
        """Whether the step just finished reads its loss terms to the host: a logging step (conf/trainer
        `log_every_n_steps`; 0: none) or the last."""
        every = self.trainer.log_every_n_steps
        return self.t == self.phase.iters or (every > 0 and self.t % every == 0)

    def training_step(self, idx: torch.Tensor, batch_idx: int):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        terms = self.losses(idx)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        for opt in opts:
            opt.step()
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
            sched.step()
        self.t += 1
        if not self.reads_losses():
            return
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        if self.logger is not None:
            metrics = {f"{self.log_prefix}/{k}": v for k, v in self.last.items()}
            for name, opt in zip(self.optimizer_names, opts):
                metrics[f"{self.log_prefix}/lr_{name}"] = opt.param_groups[0]["lr"]
            self.logger.log_metrics(metrics, step=self.step_offset + self.t)


class UnitProgress(L.Callback):
    """One progress bar per unit ("unit 3/11 layer1.1") with the loss terms the latest logging step read."""

    def __init__(self, desc: str, total: int, disable: bool | None = None):
        self.desc, self.total, self.disable, self.bar = desc, total, disable, None

    def on_train_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, leave=False, dynamic_ncols=True,
                        disable=self.disable)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bar.update(1)
        if pl_module.reads_losses():
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in pl_module.last.items()}, refresh=False)

    def on_train_end(self, trainer, pl_module):
        self.bar.close()
