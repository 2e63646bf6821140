"""Observers: statistics of a tensor -> (scale, zero point) on a `Grid`, per channel or per tensor.

* `MinMaxObserver`: the tensor's range.
* `LpObserver`: spec §1.2 grid search, mean |x - x_q|^p (p = 2.4): one-sided tensors a 1-D search over
  100 clipping thresholds, two-sided ones the 2-D search over 100 ranges x every zero point.
* `CosineObserver`: the same candidates scored by cosine distance 1 - cos(x, x_q).
On a symmetric grid (zero point fixed at 0, `pdq.quant.backends`) the searches are the 1-D search over clipping
thresholds of max |x| (signed) or max x (unsigned). An observer takes the grid, or a width for the papers' grid.
"""

from __future__ import annotations

import torch

from pdq.checks import check_float, check_int
from pdq.quant.functional import MIN_SCALE, Grid, as_grid, channel_view, from_codes, qparams_from_range, to_codes

QParams = tuple[torch.Tensor, torch.Tensor]


class Observer:
    def __call__(self, x: torch.Tensor, grid: Grid | int, ch_axis: int | None = None) -> QParams:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MinMaxObserver(Observer):
    @torch.no_grad()
    def __call__(self, x, grid, ch_axis=None):
        lo, hi = torch.aminmax(channel_view(x.detach().float(), ch_axis), dim=1)
        return qparams_from_range(lo, hi, grid)


class GridSearchObserver(Observer):
    """Candidate grid of spec §1.2; subclasses define `score` (per channel, lower is better).

    Candidate ranges always come from the full tensor. With `max_samples`, candidates are scored on a
    seeded random subset of at most that many elements per channel (the official code scores all of
    them on a GPU; on a CPU a 256-image activation tensor makes the 100 x 2^b grid take minutes)."""

    def __init__(self, grid: int = 100, max_samples: int | None = None, seed: int = 0,
                 chunk_elems: int = 2 ** 22):
        name = type(self).__name__
        self.grid = check_int(f"{name}.grid", grid, 1)
        self.chunk_elems = check_int(f"{name}.chunk_elems", chunk_elems, 1)
        self.max_samples = None if max_samples is None else check_int(f"{name}.max_samples", max_samples, 1)
        self.seed = check_int(f"{name}.seed", seed, 0)

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_samples is None or x.shape[1] <= self.max_samples:
            return x
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        idx = torch.randperm(x.shape[1], generator=g)[: self.max_samples].to(x.device)
        return x[:, idx]

    def score(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """x: [C, K]; xq: [..., C, K] -> [..., C]."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x, grid, ch_axis=None):
        g = as_grid(grid)
        x = channel_view(x.detach().float(), ch_axis)
        lo, hi = torch.aminmax(x, dim=1)
        x = self._subsample(x)
        if g.symmetric:  # thresholds of max |x| (signed), of max x (unsigned: what is below 0 clips to 0)
            rng = torch.maximum(lo.abs(), hi.abs()) if g.signed else torch.clamp(hi, min=0)
            return self._search_1d(x, rng, g, torch.zeros_like(rng))
        if bool((lo >= 0).all()) or bool((hi <= 0).all()):
            positive = bool((lo >= 0).all())
            rng = torch.maximum(lo.abs(), hi.abs())
            return self._search_1d(x, rng, g, torch.zeros_like(rng) if positive else torch.full_like(rng, g.q_max))
        return self._search_2d(x, torch.clamp(hi, min=0) - torch.clamp(lo, max=0), g.q_max)

    def _search_1d(self, x, rng, g: Grid, zp):
        """The best of `grid` thresholds t = rng * i / grid, scale t / q_max, at the fixed zero points `zp`."""
        best = torch.full_like(rng, float("inf"))
        best_scale = torch.clamp(rng / g.q_max, min=MIN_SCALE)
        for i in range(1, self.grid + 1):
            t = rng * i / self.grid
            scale = torch.clamp(t / g.q_max, min=MIN_SCALE)
            xq = from_codes(to_codes(x, scale[:, None], zp[:, None], g), scale[:, None], zp[:, None])
            err = self.score(x, xq)
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, scale, best_scale)
        return best_scale, zp

    def _search_2d(self, x, rng, q):
        c, k = x.shape
        best = torch.full((c,), float("inf"), device=x.device)
        best_scale = torch.clamp(rng / q, min=MIN_SCALE)
        best_zp = torch.zeros(c, device=x.device)
        zps = torch.arange(q + 1, device=x.device, dtype=x.dtype)
        step = max(1, self.chunk_elems // max(1, x.numel()))
        for i in range(1, self.grid + 1):
            scale = torch.clamp(rng * i / self.grid / q, min=MIN_SCALE)  # candidate range [-z d, (q - z) d]
            base = torch.round(x / scale[:, None])  # `to_codes` for every zero point at once (round once)
            for j in range(0, q + 1, step):
                z = zps[j:j + step, None, None]
                xq = (base + z).clamp_(0, q).sub_(z).mul_(scale[:, None])
                err = self.score(x, xq)  # [nz, C]
                e, arg = err.min(dim=0)
                better = e < best
                best = torch.where(better, e, best)
                best_scale = torch.where(better, scale, best_scale)
                best_zp = torch.where(better, zps[j:j + step][arg], best_zp)
        return best_scale, best_zp



class LpObserver(GridSearchObserver):
    """Mean |x - x_q|^p per channel ("mse" in the official code, p = 2.4)."""

    def __init__(self, p: float = 2.4, grid: int = 100, max_samples: int | None = None, seed: int = 0,
                 chunk_elems: int = 2 ** 22):
        super().__init__(grid, max_samples, seed, chunk_elems)
        self.p = check_float(f"{type(self).__name__}.p", p, 0, lo_open=True)

    def score(self, x, xq):
        return xq.sub_(x).abs_().pow_(self.p).mean(dim=-1)  # xq is a scratch tensor


class CosineObserver(GridSearchObserver):
    """Cosine distance 1 - cos(x, x_q) per channel."""

    def score(self, x, xq):
        return 1 - torch.nn.functional.cosine_similarity(xq, x.expand_as(xq), dim=-1, eps=1e-12)
