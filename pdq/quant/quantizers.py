"""Fake-quant modules with observed (fixed) scale and zero point. Learned variants (LSQ scales,
AdaRound) live in their own modules and replace these during reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from pdq.quant.functional import Grid, bernoulli_mask, broadcast_to_channel, fake_quantize_fused
from pdq.quant.observers import Observer

FP_BITS = 32


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == FP_BITS):
        raise ValueError(f"{what}={bits!r} is not supported; accepted: an integer 2..8, or 32 for full precision")
    return bits


class FakeQuantizer(nn.Module):
    """Uniform fake quantization on the grid `bits` wide with codes `signed` or not, the zero point fixed at 0
    (`symmetric`) or free, and `narrow` signed codes (`pdq.quant.functional.Grid`; the default, the papers' unsigned
    affine grid); `bits=32` or `enabled=False` passes the input through."""

    def __init__(self, bits: int = 8, ch_axis: int | None = None, channels: int = 1):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = self.symmetric = self.narrow = False
        self.ch_axis = ch_axis
        n = channels if ch_axis is not None else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < FP_BITS

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.signed, self.symmetric, self.narrow)

    def set_grid(self, signed: bool, symmetric: bool, narrow: bool) -> None:
        Grid(8, signed, symmetric, narrow)  # a combination a grid accepts
        self.signed, self.symmetric, self.narrow = signed, symmetric, narrow

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    def observe(self, x: torch.Tensor, observer: Observer) -> None:
        if self.bits < FP_BITS:
            self.set_qparams(*observer(x, self.grid, self.ch_axis))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantized x (in float32, also under autocast); with `keep` (float 0/1), only where it is 1."""
        if not self.active:
            return x
        if not bool(self.initialized):
            raise RuntimeError(f"{self!r} is used before calibration")
        x = x.float()
        return fake_quantize_fused(x, broadcast_to_channel(self.scale, x, self.ch_axis),
                                   broadcast_to_channel(self.zero_point, x, self.ch_axis), self.grid, keep)

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.ch_axis is None else f"per-channel(axis={self.ch_axis})"
        kind = ("signed" if self.signed else "unsigned") + (", symmetric" if self.symmetric else "") + (
            ", narrow" if self.narrow else "")
        return f"bits={self.bits}, {kind}, {axis}, enabled={self.enabled}"


class WeightQuantizer(FakeQuantizer):
    """Per-output-channel weight quantizer."""

    def __init__(self, bits: int, out_channels: int):
        super().__init__(bits, ch_axis=0, channels=out_channels)


class ActQuantizer(FakeQuantizer):
    """Per-tensor activation quantizer.

    * With `calibrate_with` set, the next forward first fits scale/zero point to its input (so
      quantizers are initialised in forward order, each seeing the already-quantized activations
      before it), then quantizes.
    * `learn_scale()` turns the scale into a trainable parameter (LSQ-style, no gradient scaling;
      the zero point stays fixed); `freeze_scale()` turns it back into a buffer.
    * QDrop: with `drop_prob < 1`, each element is quantized with probability `drop_prob` (to 1/65536) and
      left in full precision otherwise, drawn from `generator` at every forward."""

    def __init__(self, bits: int):
        super().__init__(bits, ch_axis=None)
        self.calibrate_with: Observer | None = None
        self.drop_prob = 1.0
        self.generator: torch.Generator | None = None

    def learn_scale(self) -> nn.Parameter:
        value = self.scale.detach().clone()
        del self.scale
        self.scale = nn.Parameter(value)
        return self.scale

    def freeze_scale(self) -> None:
        if isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.register_buffer("scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_with is not None and self.active:
            self.observe(x, self.calibrate_with)
            self.calibrate_with = None
        if self.drop_prob >= 1.0 or not self.active:
            return super().forward(x)
        return super().forward(x, bernoulli_mask(x, self.drop_prob, self.generator))
