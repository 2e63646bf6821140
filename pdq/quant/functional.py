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
