"""Where a run's per-unit caches live (`calib.cache_device`): the unit inputs on each path, the FP outputs and
the DC-corrected inputs, over the whole calibration set.

- `null`: on the compute device (the default);
- `cpu`: in host memory, page-locked when the compute device is a GPU, each step's rows copied to the GPU
  asynchronously: a GPU then holds one batch of them instead of the whole set;
- `disk`: in memory-mapped files under `calib.spill_dir`, which the kernel pages in and out as the host's memory
  allows. The files are unlinked as soon as they are mapped, so that nothing is left behind, even by a crash.

A cache is filled row batch by row batch into a tensor allocated whole (`empty`), never assembled from a list
of batches, so that it is held once. The values do not depend on where they live: a run gives the same
results, bit for bit, whichever the cache device."""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import weakref
from pathlib import Path

import torch

CACHE_DEVICES = (None, "cpu", "disk")


def dim_order(t: torch.Tensor) -> list[int]:
    """`t`'s dims from the outermost in memory to the innermost (ties, from dims of size one, in dim order)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def empty_in_order(shape: tuple[int, ...], dtype: torch.dtype, order: list[int] | None, device: torch.device,
                   pinned: bool = False) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose dims lie in memory in `order` (None: row-major)."""
    order = list(range(len(shape))) if order is None else order
    t = torch.empty([shape[d] for d in order], dtype=dtype, device=device, pin_memory=pinned)
    return t.permute([order.index(d) for d in range(len(shape))])


#: host caches at least this large get pages of their own (an anonymous mapping) instead of malloc's heap: glibc
#: serves no larger block from a mapping of its own by default (its threshold's ceiling on 64-bit systems)
OWN_PAGES_BYTES = 32 * 2 ** 20


class CacheStore:
    """Allocates the caches: `empty` a tensor for rows to be written into, `put` a finished tensor. Large host
    caches get pages of their own: a whole-set cache lives as long as its unit, and on malloc's heap (where
    `keep_freed_memory` puts every block) the hole it leaves is too small for the next unit's caches and too
    large to sit idle, so the heap grew by a cache per unit (MobileNetV2 at 224x224 with 1,024 images: 2.2 GiB
    over what it held)."""

    def __init__(self, kind: str | None, compute: torch.device, spill_dir: str | Path | None = None):
        if kind not in CACHE_DEVICES:
            raise ValueError(f"cache device {kind!r}; accepted: {CACHE_DEVICES}")
        if kind == "disk" and spill_dir is None:
            raise ValueError("calib.cache_device=disk needs calib.spill_dir")
        self.kind, self.compute = kind, torch.device(compute)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.device = self.compute if kind is None else torch.device("cpu")
        self.pinned = kind == "cpu" and self.compute.type == "cuda"
        self._mapped: set[int] = set()  # where the mappings this store made start (`owns`)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, order: list[int] | None = None) -> torch.Tensor:
        """An uninitialised tensor of `shape` whose dims lie in memory in `order` (None: row-major)."""
        order = list(range(len(shape))) if order is None else order
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.kind == "disk":
            flat = self._file(numel, dtype)
        elif self.device.type == "cpu" and not self.pinned and nbytes >= OWN_PAGES_BYTES:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # anonymous, not shared memory
            flat = torch.frombuffer(buf, dtype=dtype, count=numel)  # keeps the mapping while it lives
            self._mapped.add(flat.data_ptr())
            weakref.finalize(buf, self._mapped.discard, flat.data_ptr())
        else:
            return empty_in_order(shape, dtype, order, self.device, self.pinned)
        return flat.view([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])

    def _file(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="cache-", suffix=".bin", dir=self.spill_dir)
        os.close(fd)
        try:
            return torch.from_file(name, shared=True, size=max(numel, 1), dtype=dtype)[:numel]
        finally:
            os.unlink(name)  # the mapping keeps the pages; the name goes now

    def owns(self, t: torch.Tensor) -> bool:
        """Whether `t` lives where this store puts its caches."""
        if self.kind == "disk":
            return False  # a tensor of the disk store is put once, when it is made (`empty`)
        if t.device != self.device or (self.pinned and not t.is_pinned()):
            return False
        return self.device.type != "cpu" or self.pinned or t.untyped_storage().data_ptr() in self._mapped or \
            t.untyped_storage().nbytes() < OWN_PAGES_BYTES

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as a cache of this store: `t` itself where it lives here already, else a copy in `t`'s layout."""
        if self.owns(t):
            return t
        out = self.empty(tuple(t.shape), t.dtype, dim_order(t))
        return out.copy_(t)
