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


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it. True where it took effect;
    False where there is no glibc `mallopt` (macOS, Windows, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
