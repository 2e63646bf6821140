"""Integer codes packed at their real width: a little-endian bitstream of `bits`-bit unsigned codes, in
row-major order (code i occupies bits [i*bits, (i+1)*bits) of the stream; bit k of the stream is bit k % 8
of byte k // 8). 2-bit codes take a quarter of a byte, 3-bit codes 3/8, 4-bit codes half a byte."""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take."""
    return math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (integers in [0, 2^bits - 1], any shape) as a flat uint8 tensor of `packed_size` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not accepted; accepted: 1..8")
    flat = codes.detach().reshape(-1).to("cpu", torch.int64)
    if len(flat) and (flat.min() < 0 or flat.max() > 2 ** bits - 1):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] cannot be packed at {bits} bits")
    as_bytes = flat.numpy().astype(np.uint8)[:, None]
    stream = np.unpackbits(as_bytes, axis=1, count=bits, bitorder="little")  # [n, bits], low bit first
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The uint8 codes of `shape` that `pack` stored in `packed`."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) != packed_size(n, bits):
        raise ValueError(f"{len(packed) if packed.dim() == 1 else list(packed.shape)} {packed.dtype} bytes do not hold "
                         f"{n} codes of {bits} bits ({packed_size(n, bits)} uint8 bytes)")
    stream = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    codes = np.packbits(stream, axis=1, bitorder="little").reshape(-1)
    return torch.from_numpy(codes).reshape(tuple(shape))
