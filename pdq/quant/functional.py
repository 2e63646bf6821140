"""Pure quantization math, the one set of primitives every quantizer, observer and exporter uses.

* `Grid`: the integer grid of a quantizer: its width, signed or unsigned codes, a free (affine) or a fixed-zero
  (symmetric) zero point, and for signed grids the narrow range -(2^(b-1) - 1)..2^(b-1) - 1. pdq's papers use
  the unsigned affine grid [0, 2^b - 1] (spec §1.1, `Grid(bits)`); runtimes' integer kernels want others
  (`pdq.quant.backends`).
* `to_codes` / `from_codes`: code = clamp(round(x / s) + z, q_min, q_max), value = s * (code - z).
* `fake_quantize`: from_codes(to_codes(x)) with straight-through rounding, and `fake_quantize_fused`, the same as
  one autograd node for the reconstruction's inner loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-8


@dataclass(frozen=True)
class Grid:
    """An integer grid: `bits` wide, codes signed or unsigned, zero point free (`symmetric=False`) or fixed at 0,
    signed codes over the narrow range (-(2^(b-1) - 1)..) when `narrow`."""
    bits: int
    signed: bool = False
    symmetric: bool = False
    narrow: bool = False

    def __post_init__(self):
        if self.signed and not self.symmetric:
            raise ValueError("a signed grid has its zero point at 0 (symmetric=True); accepted: unsigned affine, "
                             "unsigned symmetric or signed symmetric grids")
        if self.narrow and not self.signed:
            raise ValueError("narrow range is a signed grid's (-(2^(b-1) - 1)..2^(b-1) - 1)")

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1)) + int(self.narrow) if self.signed else 0

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1


def as_grid(grid: Grid | int) -> Grid:
    """`grid` itself, or for a width the papers' unsigned affine grid of that width."""
    return grid if isinstance(grid, Grid) else Grid(int(grid))


def qmax(bits: int) -> int:
    return 2 ** int(bits) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient."""
    return (x.round() - x).detach() + x


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid | int) -> torch.Tensor:
    """The integer codes (as floats) of x on `grid`: clamp(round(x / s) + z, q_min, q_max)."""
    g = as_grid(grid)
    return torch.div(x, scale).round_().add_(zero_point).clamp_(g.q_min, g.q_max)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The values of integer codes: s * (code - z)."""
    return (codes - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid | int) -> torch.Tensor:
    """x_q = s * (clamp(round(x / s) + z, q_min, q_max) - z). Gradient: identity inside the range (STE),
    zero outside; w.r.t. a learnable scale it is the LSQ gradient (round(x/s) - x/s inside, the clipped
    grid end outside)."""
    g = as_grid(grid)
    q = torch.clamp(round_ste(x / scale) + zero_point, g.q_min, g.q_max)
    return from_codes(q, scale, zero_point)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, grid: Grid | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (widened to include 0) on `grid`; a symmetric grid covers
    [-max|.|, max|.|] (signed) or [0, hi] (unsigned), with zero point 0."""
    g = as_grid(grid)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if g.symmetric:
        rng = torch.maximum(-lo, hi) if g.signed else hi
        return torch.clamp(rng / g.q_max, min=MIN_SCALE), torch.zeros_like(rng)
    scale = torch.clamp((hi - lo) / g.q_max, min=MIN_SCALE)
    zero_point = torch.clamp(-torch.round(lo / scale), 0, g.q_max)
    return scale, zero_point


def channel_view(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """[C, K] view for per-channel statistics, [1, numel] for per-tensor."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def broadcast_to_channel(v: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector [C] so it broadcasts against x along ch_axis."""
    if ch_axis is None:
        return v.reshape(())
    shape = [1] * x.ndim
    shape[ch_axis] = -1
    return v.reshape(shape)


def _unit_step(t: torch.Tensor) -> torch.Tensor:
    """1.0 where the integer-valued `t` is positive, else 0.0, in place: float arithmetic, where comparisons
    to a bool tensor and selections by one cost several times as much on a CPU."""
    return t.clamp_(0, 1)


def inside_grid(values: torch.Tensor, grid: torch.Tensor, q_min: int, q_max: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`values` where the grid index is strictly inside (q_min, q_max), 0 at and beyond the ends (torch.clamp's
    gradient with number bounds), in one pass (into `out`, which may be `values`)."""
    if out is None:
        return torch.ops.aten.hardtanh_backward(values, grid, q_min, q_max)
    return torch.ops.aten.hardtanh_backward.grad_input(values, grid, q_min, q_max, grad_input=out)


class _FakeQuantize(torch.autograd.Function):
    """`fake_quantize` (and QDrop's selection) as one autograd node: the forward works in place on one
    buffer; the backward recomputes the grid index from the input and needs three (x / s, the grid index, the
    input's gradient). Same values as `fake_quantize`;
    the same gradients (STE for the input, LSQ for the scale) up to float rounding. Masks are float 0/1 tensors.
    On a CPU the step is bound by memory traffic: each new buffer and each pass counts."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min, q_max, keep):
        y = torch.div(x, scale).round_().add_(zero_point).clamp_(q_min, q_max).sub_(zero_point).mul_(scale)
        if keep is not None:
            torch.lerp(x, y, keep, out=y)  # exact at weights 0 and 1: x where keep is 0, y where it is 1
        ctx.save_for_backward(x, scale, zero_point, keep)
        ctx.q_min, ctx.q_max = q_min, q_max
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, keep = ctx.saved_tensors
        v = torch.div(x, scale)
        grid = torch.round(v).add_(zero_point)  # the grid index before clamping, integer-valued
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:  # STE inside the range; a dropped (FP) element passes its gradient
            grad_x = inside_grid(grad, grid, ctx.q_min, ctx.q_max)
            if keep is not None:
                torch.lerp(grad, grad_x, keep, out=grad_x)
        if ctx.needs_input_grad[1]:  # LSQ: round(x/s) - x/s inside, the clipped grid end outside
            inside = inside_grid(v, grid, ctx.q_min, ctx.q_max, out=v)
            lsq = grid.clamp_(ctx.q_min, ctx.q_max).sub_(zero_point).sub_(inside)
            if keep is not None:
                lsq.mul_(keep)
            grad_scale = lsq.mul_(grad).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None, None


def fake_quantize_fused(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid | int,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize(x, scale, zero_point, grid)`, where `keep` (float 0/1, x's shape, as `bernoulli_mask`
    draws it) selects the elements that are quantized (QDrop; the others stay x), in fewer passes over
    memory. The zero point is not learnable."""
    if zero_point.requires_grad:
        raise ValueError("fake_quantize_fused: the zero point must not require a gradient")
    g = as_grid(grid)
    return _FakeQuantize.apply(x, scale, zero_point, g.q_min, g.q_max, keep)


def bernoulli_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Float 0/1 tensor shaped (and laid out in memory) like `like`, each element 1 with probability p, exact
    to 1/65536: one random bit per element for p = 0.5 (QDrop's), 8 where p is a multiple of 1/256, 16
    otherwise, several times faster on a CPU than `torch.rand(shape) < p`. Float, not bool: selecting by it is
    `torch.lerp`, several times cheaper than `torch.where` on a CPU."""
    if p <= 0 or p >= 1:
        return torch.full_like(like, float(p >= 1), dtype=torch.float32)
    n = like.numel()
    if p == 0.5:  # element j * len(bytes) + i is bit j of random byte i
        data = _random_bits(n, like.device, generator).view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=like.device).unsqueeze(1)
        flat = torch.bitwise_right_shift(data, shifts).bitwise_and_(1).view(-1)[:n].float()
    else:
        dtype = torch.int8 if float(p * 256).is_integer() else torch.int16
        levels = 2 ** (8 * dtype.itemsize)
        # 1 where the signed draw w < t: the integers t - w >= 1, clamped to [0, 1]
        draws = _random_bits(8 * dtype.itemsize * n, like.device, generator).view(dtype)[:n]
        flat = _unit_step(draws.float().neg_().add_(round(p * levels) - levels // 2))
    if is_channels_last(like):
        return flat.as_strided(like.shape, like.stride())  # i.i.d. elements: any dense layout is the same draw
    return flat.view(like.shape)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels-last (and not also contiguous, as a tensor with one channel or pixel is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _random_bits(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """At least n uniformly random bits, as 64-bit words."""
    return torch.empty(-(-n // 64), dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1,
                                                                               generator=generator)
