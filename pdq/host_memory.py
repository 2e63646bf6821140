"""Host memory: let glibc's malloc keep freed memory for reuse.

glibc serves every allocation above its mmap threshold (which it raises to at most 32 MiB) with fresh pages
from the kernel and gives them back on free. Every large tensor an operation creates then pays a page fault
per 4 KiB page when it is first written: a temporary of 51 MiB (1,024 x 16 x 28 x 28 floats) allocated and freed
several times per step made a single `addcmul` over it take 22 ms this way against 2.3 ms on reused memory on the
2-core CPU. `keep_freed_memory()` turns this off for the process (`mallopt`: no mmap for large blocks, no trimming
of the heap), so freed memory is reused. The process's resident memory then stays near its peak instead of
shrinking after it. The whole-set caches do not take part: `pdq.recon.store` gives them pages of their own, so
that the holes they leave do not grow the heap.

The `pdq` command (`python run.py` in a checkout) calls it when `keep_freed_memory` is true (the default;
conf/config.yaml). Importing pdq does not: a Python caller chooses for its own process."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4


def _glibc(name: str):
    """glibc's function `name`, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), name, None)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it. True where it took effect;
    False where there is no glibc `mallopt` (macOS, Windows, musl), which is left as it is."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the free pages of glibc's heap back to the kernel (`malloc_trim`); False where there is no glibc.
    The reconstruction engine calls it between the stages of a unit (caching, DC, activation initialisation,
    the fit): each stage's working set differs in its block sizes from the last's, so a heap that keeps freed
    memory would otherwise add the stages' working sets up instead of reusing one for the next (ResNet-18 at
    224x224 with 1,024 images: 860 MiB above the plan at the first unit). Inside a stage, which allocates the
    same blocks step after step, freed memory is still reused."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
