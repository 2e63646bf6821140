"""Every loss term of reconstruction and Distribution Correction, each a small named function or class.

* `reconstruction_loss`: the unit-output term (spec §1.5, §4; PD-Quant's regulariser, §5.2);
* `prediction_difference`: PD-Quant's KL term on the network output (spec §5.2);
* `RoundingRegularizer`: AdaRound's f_reg with its beta schedule and warm-up gate (spec §1.5);
* `bn_statistics_loss`, `proximity_loss`: the two terms of Distribution Correction (spec §5.3);
* `pd_loss`: the PD term of a whole network over a set of images, as a number (sensitivities: per layer in
  `pdq.mixed`, per unit in `pdq.recon.steps`).

A phase weights them (`Phase.rec_weight`, `pd_weight`, `round_weight`, `DCConfig.lambda_c`); adding a term
means one function or class here, one `Phase` field for its weight and one key in `conf/method/_recon.yaml`.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-6


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """mean over (batch, spatial) of sum over channels |out - target|^p (the official `lp_loss`)."""
    if p == 2:
        return _SquaredError.apply(out, target) / (out.numel() // out.shape[1])
    return (out - target).abs().pow(p).sum(1).mean()


class _SquaredError(torch.autograd.Function):
    """sum((a - b)^2) in three passes over memory (the difference and its norm; backward: 2 g (a - b)), about half
    of what autograd's square, sum and mean take; a unit's step is bound by memory traffic on a CPU."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (diff,) = ctx.saved_tensors
        grad = diff * (2 * g)
        return grad, -grad if ctx.needs_input_grad[1] else None


def prediction_difference(logits_q: torch.Tensor, logits_fp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_fp / T) || softmax(z_q / T)), summed over classes and averaged over the batch (no T^2)."""
    log_q = torch.log_softmax(logits_q / temperature, dim=1)
    p_fp = torch.softmax(logits_fp / temperature, dim=1)
    return torch.nn.functional.kl_div(log_q, p_fp, reduction="batchmean")


def rounding_penalty(h: torch.Tensor, beta: float) -> torch.Tensor:
    """f_reg = sum(1 - |2 h(V) - 1|^beta): zero when every h(V) is 0 or 1, one per weight at h = 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class RoundingRegularizer:
    """AdaRound's rounding term over `iters` steps t = 1..iters: off while t < warmup * iters, then
    beta decays linearly from b_range[0] to b_range[1], which it reaches at the last step."""

    def __init__(self, iters: int, warmup: float, b_range: tuple[float, float]):
        self.iters, self.start = iters, warmup * iters
        self.start_b, self.end_b = float(b_range[0]), float(b_range[1])

    def active(self, t: int) -> bool:
        return t >= self.start

    def beta(self, t: int) -> float:
        if t < self.start:
            return self.start_b
        rel = (t - self.start) / max(self.iters - self.start, 1)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1 - rel)

    def __call__(self, hs: list[torch.Tensor], t: int) -> torch.Tensor | None:
        """sum of f_reg over the rounding variables' h(V) at step t; None during the warm-up."""
        if not self.active(t):
            return None
        beta = self.beta(t)
        return sum(rounding_penalty(h, beta) for h in hs)


class _SpatialVarMean(torch.autograd.Function):
    """Per-sample, per-channel variance (Bessel-corrected) and mean over the positions (every dim after the
    first two). Forward: two passes (the mean, then the norm of the centred values), stable and about 3x faster
    on a CPU than `torch.var_mean`'s Welford loop. Backward: one pass over the centred values d,
    d/da = s * d + g_mean / n with s = 2 g_var / (n - 1), where autograd's `var_mean` backward takes several
    passes and temporaries. This memory-bound step is most of DC's cost on a CPU."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = tuple(range(2, a.dim()))
        mean = a.mean(dims, keepdim=True)
        centred = a - mean
        var = torch.linalg.vector_norm(centred, 2, dim=dims).square_().div_(a[0, 0].numel() - 1)
        ctx.save_for_backward(centred)
        return var, mean.flatten(1)

    @staticmethod
    def backward(ctx, g_var: torch.Tensor, g_mean: torch.Tensor) -> torch.Tensor:
        centred, = ctx.saved_tensors
        n = centred[0, 0].numel()
        spatial = (...,) + (None,) * (centred.dim() - 2)
        return torch.addcmul((g_mean / n)[spatial], centred, (g_var * (2.0 / (n - 1)))[spatial])


def bn_statistics_loss(inputs: list[torch.Tensor], bns: list[nn.Module], denominator: int | None = None
                       ) -> torch.Tensor:
    """DC's BN term: for each BatchNorm, sum over channels of (per-sample mean - running mean)^2 and
    (per-sample std - running std)^2, summed over the batch and divided by `denominator` (default: the
    batch size, i.e. the mean; computed as the mean times n / denominator, so that one process gives the
    same bits as a DDP rank). Per-sample statistics are over the spatial positions. Where a sample has a
    single position per channel (BatchNorm1d on [N, C], a 1x1 map), its standard deviation is undefined
    and only the mean term counts."""
    loss = inputs[0].new_zeros(())
    for a, bn in zip(inputs, bns):
        if a[0, 0].numel() > 1:
            var, mean = _SpatialVarMean.apply(a)
            sigma = torch.sqrt(var + BN_EPS)
            loss = loss + (sigma - torch.sqrt(bn.running_var + BN_EPS)).pow(2).sum(1).mean()
        else:
            mean = a.reshape(a.shape[:2])
        loss = loss + (mean - bn.running_mean).pow(2).sum(1).mean()
    return loss if denominator is None else loss * (len(inputs[0]) / denominator)


def proximity_loss(x: torch.Tensor, target: torch.Tensor, denominator: int | None = None) -> torch.Tensor:
    """DC's proximity term: mean over (batch, spatial) of sum over channels (x - target)^2, normalised like
    `bn_statistics_loss`."""
    loss = torch.nn.functional.mse_loss(x, target, reduction="sum") / (target.numel() // target.shape[1])
    return loss if denominator is None else loss * (len(target) / denominator)


def batched_logits(gm: nn.Module, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [gm(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def pd_loss(gm: nn.Module, images: torch.Tensor, fp: list[torch.Tensor], batch_size: int, temperature: float) -> float:
    """The PD loss over `images`; exactly 0 where the logits are the FP ones (the KL's float rounding aside)."""
    total = sum(0.0 if torch.equal(q, f) else prediction_difference(q, f, temperature).item() * len(q)
                for q, f in zip(batched_logits(gm, images, batch_size), fp, strict=True))
    return total / len(images)
