"""One unit's optimisation as a LightningModule (manual optimisation: one Adam for the AdaRound
variables, one Adam + cosine schedule for the activation scales, one backward per step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pdq.distributed import progress_disabled
from pdq.quant.adaround import AdaRoundQuantizer, LinearTempDecay


@dataclass
class Caches:
    """Per-unit tensors over the whole calibration set (on the compute device)."""
    x_q: torch.Tensor | None            # unit input on the quantized path
    x_fp: torch.Tensor | None           # unit input on the FP path (DC-corrected when DC is on)
    y_fp: torch.Tensor                  # FP unit output on that input (target)
    logits: torch.Tensor | None = None  # FP network logits on the calibration images (PD loss)

    def __len__(self) -> int:
        return len(self.y_fp)


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


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """mean over (batch, spatial) of sum over channels |out - target|^p (official `lp_loss`)."""
    diff = (out - target).abs()
    return (diff.pow(2) if p == 2 else diff.pow(p)).sum(1).mean()


class UnitReconstruction(L.LightningModule):
    def __init__(self, unit: nn.Module, caches: Caches, *, iters: int, input_prob: float, rec_p: float,
                 adarounds: list[AdaRoundQuantizer], scales: list[nn.Parameter], round_lr: float,
                 scale_lr: float, round_weight: float, warmup: float, b_range: tuple[float, float],
                 mask_generator: torch.Generator, log_prefix: str, step_offset: int, log_every: int = 50,
                 rec_weight: float = 1.0, pd_weight: float = 0.0, temperature: float = 1.0,
                 suffix: nn.Module | None = None, pd_branch_drop: bool = True, drop_quantizers: tuple = (),
                 round_optimizer: Callable | None = None, scale_optimizer: Callable | None = None,
                 scale_scheduler: Callable | None = None):
        super().__init__()
        self.round_optimizer, self.scale_optimizer, self.scale_scheduler = (round_optimizer, scale_optimizer,
                                                                            scale_scheduler)
        self.unit = unit
        self.rec_weight, self.pd_weight, self.temperature = rec_weight, pd_weight, temperature
        self.suffix, self.pd_branch_drop, self.drop_quantizers = suffix, pd_branch_drop, drop_quantizers
        self.caches = caches
        self.iters, self.input_prob, self.rec_p = iters, input_prob, rec_p
        self.adarounds = nn.ModuleList(adarounds)
        self.scales = nn.ParameterList(scales)
        self.round_lr, self.scale_lr, self.round_weight = round_lr, scale_lr, round_weight
        self.schedule = LinearTempDecay(iters, warmup, *b_range)
        self.mask_generator = mask_generator
        self.log_prefix, self.step_offset, self.log_every = log_prefix, step_offset, log_every
        self.automatic_optimization = False
        self.t = 0
        self.last: dict[str, float] = {}

    def configure_optimizers(self):
        """Optimisers from the phase's partials (`round_optimizer`, `scale_optimizer`, `scale_scheduler`);
        without them the official choice: Adam for each, cosine annealing to 0 for the scales."""
        opts, scheds = [], []
        if len(self.adarounds):
            make = self.round_optimizer or partial(torch.optim.Adam, lr=self.round_lr)
            opts.append(make([q.alpha for q in self.adarounds]))
        if len(self.scales):
            opt = (self.scale_optimizer or partial(torch.optim.Adam, lr=self.scale_lr))(list(self.scales))
            opts.append(opt)
            sched = self.scale_scheduler or partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=self.iters,
                                                    eta_min=0.0)
            scheds.append(sched(opt))
        return opts, scheds

    def unit_input(self, idx: torch.Tensor) -> torch.Tensor:
        """The unit input of a batch (caches may be float16/bfloat16; the unit computes in float32)."""
        c = self.caches
        if self.input_prob >= 1.0:
            return c.x_q[idx].float()
        if self.input_prob <= 0.0:
            return c.x_fp[idx].float()
        x_q, x_fp = c.x_q[idx].float(), c.x_fp[idx].float()
        keep = torch.rand(x_q.shape, generator=self.mask_generator, device=x_q.device) < self.input_prob
        return torch.where(keep, x_q, x_fp)

    def quantized_half(self, x_q: torch.Tensor) -> torch.Tensor:
        """Unit output on quantized-path inputs with dropping off (the `pd_branch_drop=false` variant)."""
        saved = [q.drop_prob for q in self.drop_quantizers]
        for q in self.drop_quantizers:
            q.drop_prob = 1.0
        try:
            return self.unit(x_q)
        finally:
            for q, p in zip(self.drop_quantizers, saved):
                q.drop_prob = p

    def losses(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term as it enters the total: rec_weight * L_rec + pd_weight * L_PD + lambda * f_reg."""
        terms: dict[str, torch.Tensor] = {}
        use_pd = self.pd_weight > 0 and self.suffix is not None
        out = out_q = None
        if use_pd and self.pd_branch_drop and self.rec_weight > 0:
            # PD-Quant: one forward of [mixed half ; quantized half], dropping on in both (spec §5.2)
            out, out_q = self.unit(torch.cat([self.unit_input(idx), self.caches.x_q[idx].float()])).split(len(idx))
        else:
            if self.rec_weight > 0:
                out = self.unit(self.unit_input(idx))
            if use_pd:
                x_q = self.caches.x_q[idx].float()
                out_q = self.unit(x_q) if self.pd_branch_drop else self.quantized_half(x_q)
        if out is not None:
            terms["rec_loss"] = self.rec_weight * reconstruction_loss(out, self.caches.y_fp[idx].float(), self.rec_p)
        if use_pd:
            t = self.temperature
            log_q = torch.log_softmax(self.suffix(out_q) / t, dim=1)
            p_fp = torch.softmax(self.caches.logits[idx] / t, dim=1)
            terms["pd_loss"] = self.pd_weight * torch.nn.functional.kl_div(log_q, p_fp, reduction="batchmean")
        ref = out if out is not None else out_q
        if len(self.adarounds):
            beta = self.schedule(self.t)
            active = self.schedule.active(self.t)
            terms["round_loss"] = (self.round_weight * sum(q.round_loss(beta) for q in self.adarounds)
                                   if active else ref.new_zeros(()))
        terms["loss"] = sum(terms.values())
        return terms

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
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        if self.logger is not None and (self.t % self.log_every == 0 or self.t == self.iters):
            metrics = {f"{self.log_prefix}/{k}": v for k, v in self.last.items()}
            for i, opt in enumerate(opts):
                metrics[f"{self.log_prefix}/lr_{'round' if i == 0 and len(self.adarounds) else 'scale'}"] = \
                    opt.param_groups[0]["lr"]
            self.logger.log_metrics(metrics, step=self.step_offset + self.t)


class UnitProgress(L.Callback):
    """One progress bar per unit ("unit 3/11 layer1.1") with the latest loss terms."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.bar = desc, total, None

    def on_train_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, leave=False, dynamic_ncols=True,
                        disable=progress_disabled())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bar.update(1)
        if pl_module.t % 10 == 0:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in pl_module.last.items()}, refresh=False)

    def on_train_end(self, trainer, pl_module):
        self.bar.close()
