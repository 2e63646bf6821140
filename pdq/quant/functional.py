"""Pure fake-quantization math (spec §1.1): unsigned asymmetric grid [0, 2^b - 1], straight-through rounding."""

from __future__ import annotations

import torch

MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    return 2 ** int(bits) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient."""
    return (x.round() - x).detach() + x


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """x_q = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z). Gradient: identity inside the range (STE),
    zero outside; w.r.t. a learnable scale it is the LSQ gradient (round(x/s) - x/s inside, the clipped
    grid end outside)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax(bits))
    return (q - zero_point) * scale


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (widened to include 0)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax(bits), min=MIN_SCALE)
    zero_point = torch.clamp(-torch.round(lo / scale), 0, qmax(bits))
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


class _FakeQuantize(torch.autograd.Function):
    """`fake_quantize` (and QDrop's selection) as one autograd node: the forward works in place on one
    buffer, the backward recomputes the grid index from the input. Same values as `fake_quantize`; the same
    gradients (STE for the input, LSQ for the scale) up to float rounding."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_max, keep):
        y = torch.div(x, scale).round_().add_(zero_point).clamp_(0, q_max).sub_(zero_point).mul_(scale)
        if keep is not None:
            y = torch.where(keep, y, x)
        ctx.save_for_backward(x, scale, zero_point, keep)
        ctx.q_max = q_max
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, keep = ctx.saved_tensors
        v = torch.div(x, scale)
        grid = torch.round(v).add_(zero_point)  # the grid index before clamping
        inside = (grid > 0).logical_and_(grid < ctx.q_max)  # as torch.clamp's gradient: none at the grid ends
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:  # STE inside the range; a dropped (FP) element passes its gradient
            grad_x = grad * (inside if keep is None else inside.logical_or(keep.logical_not()))
        if ctx.needs_input_grad[1]:  # LSQ: round(x/s) - x/s inside, the clipped grid end outside
            lsq = grid.clamp_(0, ctx.q_max).sub_(zero_point).sub_(v.mul_(inside))
            if keep is not None:
                lsq.mul_(keep)
            grad_scale = (grad * lsq).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None


def fake_quantize_fused(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize(x, scale, zero_point, bits)`, where `keep` (bool, x's shape) selects the elements that
    are quantized (QDrop; the others stay x), in fewer passes over memory. The zero point is not learnable."""
    if zero_point.requires_grad:
        raise ValueError("fake_quantize_fused: the zero point must not require a gradient")
    return _FakeQuantize.apply(x, scale, zero_point, qmax(bits), keep)


def bernoulli_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bool tensor shaped (and laid out in memory) like `like`, each element True with probability p (to
    1/65536), from 16 random bits per element, four per 64-bit draw: a third of the time of
    `torch.rand(shape) < p` on a 2-core CPU."""
    if p <= 0 or p >= 1:
        return torch.full_like(like, p >= 1, dtype=torch.bool)
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-2 ** 63, 2 ** 63 - 1,
                                                                                     generator=generator)
    flat = words.view(torch.int16)[:n] < round(p * 65536) - 32768
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return flat.as_strided(like.shape, like.stride())  # i.i.d. elements: any dense layout is the same draw
    return flat.view(like.shape)
