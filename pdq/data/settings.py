"""Checks of the data settings both data modules share; `data.num_workers=null` is resolved here, in one place."""

from __future__ import annotations

import os

from pdq.errors import PdqError

#: data.num_workers=null: one loader process per available core, at most this many
WORKER_CAP = 8


def available_cores() -> int:
    """The cores this process may run on (a SLURM job's share, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(value: int | None) -> int:
    """null: min(available cores, WORKER_CAP); an explicit value must be 0..available cores (more only
    oversubscribes the machine, and torch warns about it)."""
    cores = available_cores()
    if value is None:
        return min(cores, WORKER_CAP)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cores:
        raise PdqError(f"data.num_workers={value!r} is not accepted: this process may use {cores} CPU cores; "
                       f"accepted: null (min(cores, {WORKER_CAP}) = {min(cores, WORKER_CAP)}) or an integer 0..{cores}")
    return value


def check_eval_subset(value, test_size: int | None = None) -> int:
    """data.eval_subset: null (the whole test split) or 1..test size."""
    upper = f"1..{test_size}" if test_size is not None else "an integer from 1 to the test split's size"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (test_size and value > test_size):
        raise PdqError(f"data.eval_subset={value!r} is not accepted; accepted: null (the whole test split) or {upper}")
    return value
