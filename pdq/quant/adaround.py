"""AdaRound learned rounding (spec §1.5): W~ = s * (clamp(floor(W/s) + h(V) + z, q_min, q_max) - z) on the weight
quantizer's grid (the papers' [0, 2^b - 1]),
h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), V initialised so that h(V) = frac(W/s).

With `learn_scale` (Genie-M, `method.learn_weight_scale`) the per-channel scale s is a parameter learned with V.
floor(W/s0) stays what it was at the initial scale s0, so W~ = s * (clamp(floor(W/s0) + h(V) + z, ...) - z): the
rounding variables keep choosing between the same two codes while s stretches the channel's grid, and
dW~/ds = clamp(...) - z, the code itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pdq.quant.functional import broadcast_to_channel, from_codes, inside_grid
from pdq.quant.quantizers import WeightQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    """Replaces a layer's (calibrated) `WeightQuantizer` while its unit is reconstructed. `soft=True`
    uses h(V); after `harden()` rounding is floor(W/s0) + 1[V >= 0] (s0: the scale it was built with). A soft
    forward computes the weight and h(V) together (`soft_round`); inside `soft_rounding(...)` it hands that h(V)
    to the block's list, which the rounding regulariser of the same step takes as its argument."""

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor, learn_scale: bool = False):
        super().__init__()
        if not bool(base.initialized):
            raise RuntimeError("AdaRound needs a calibrated weight quantizer")
        self.bits, self.ch_axis, self.grid = base.bits, base.ch_axis, base.grid
        scale = broadcast_to_channel(base.scale.detach().clone(), weight, base.ch_axis)
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", broadcast_to_channel(base.zero_point.detach().clone(), weight,
                                                                base.ch_axis))
        w = weight.detach()
        # floor(W/s0), fixed while s is learned: no buffer, which DDP would broadcast at every step
        self.floor = torch.floor(w / scale)
        frac = w / scale - self.floor
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.soft = True
        self.h_sink: Callable[[torch.Tensor], None] | None = None  # where a soft forward hands its h(V)

    @property
    def active(self) -> bool:
        return True  # only an active weight quantizer is replaced (`pdq.quant.state.adaround`)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    @property
    def learns_scale(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def soft_round(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft-rounded weight and h(V), one autograd node (`_SoftRound`)."""
        return _SoftRound.apply(self.alpha, self.floor, self.scale, self.zero_point, self.grid.q_min,
                                self.grid.q_max)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The layer's quantized weight (`w`, the layer's weight, is the one this quantizer was built on)."""
        if self.soft:
            y, h = self.soft_round()
            if self.h_sink is not None:
                self.h_sink(h)
            return y
        q = torch.clamp(self.floor + (self.alpha >= 0).to(w.dtype) + self.zero_point, self.grid.q_min,
                        self.grid.q_max)
        return from_codes(q, self.scale.detach(), self.zero_point)

    def harden(self) -> None:
        self.soft = False


@contextlib.contextmanager
def soft_rounding(quantizers: list[AdaRoundQuantizer]) -> Iterator[list[torch.Tensor | None]]:
    """Yields a list with one entry per quantizer: h(V) of its latest soft forward inside the block, with its
    graph (None until it runs). The rounding regulariser takes these h(V) rather than computing h(V) again:
    its gradient then joins the weight's inside the same `_SoftRound` node."""
    hs: list[torch.Tensor | None] = [None] * len(quantizers)
    for k, q in enumerate(quantizers):
        q.h_sink = lambda h, k=k: hs.__setitem__(k, h)
    try:
        yield hs
    finally:
        for q in quantizers:
            q.h_sink = None


class _SoftRound(torch.autograd.Function):
    """The soft-rounded weight s * (clamp(floor + h(V) + z, q_min, q_max) - z) and h(V) itself, as one autograd node:
    the same values and gradients (for V, and for s when it is learned) as autograd's graph of the formula, in
    about half the operations (on weight-sized tensors their count, not their size, is the cost)."""

    @staticmethod
    def forward(ctx, alpha, floor, scale, zero_point, q_min, q_max):
        sig = torch.sigmoid(alpha)
        h = torch.mul(sig, ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        grid = torch.add(floor, h).add_(zero_point)
        y = grid.clamp(q_min, q_max).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(sig, h, grid, scale, zero_point)
        ctx.q_min, ctx.q_max = q_min, q_max
        ctx.set_materialize_grads(False)  # no zeros for h's gradient where h is not used (the warm-up)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        sig, h, grid, scale, zero_point = ctx.saved_tensors
        grad_scale = grad = None
        if grad_y is not None:
            if ctx.needs_input_grad[2]:  # dy/ds = the code, clamp(grid) - z
                grad_scale = grid.clamp(ctx.q_min, ctx.q_max).sub_(zero_point).mul_(grad_y).sum_to_size(scale.shape)
            grad = inside_grid(grad_y * scale, grid, ctx.q_min, ctx.q_max)  # dy/dh = s inside the grid (torch.clamp)
        if grad_h is not None:
            grad = grad_h.clone() if grad is None else grad.add_(grad_h)
        if grad is None:
            return None, None, grad_scale, None, None, None
        grad = inside_grid(grad, h, 0, 1, out=grad).mul_(ZETA - GAMMA)  # h's clamp to [0, 1]
        return torch.ops.aten.sigmoid_backward(grad, sig), None, grad_scale, None, None, None
