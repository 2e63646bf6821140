"""The process-wide settings a run changes, set for the run and restored after it, so that a run leaves its
process (the next job of a sequential multirun, a test session, a user's notebook) as it found it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

import lightning as L
import torch
from omegaconf import DictConfig

from pdq.config import resolvers

#: their INFO lines (one set per unit's fit) drown pdq's own; quietened for the duration of a run
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
#: unset during a run (see `run_scope`)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """Restores, after the run: the Lightning log levels, torch's deterministic-algorithms switches, WANDB_MODE
    (Lightning's offline WandbLogger sets it), and pdq's OmegaConf resolvers (registered for the run only).
    During the run PYTORCH_NVML_BASED_CUDA_CHECK is unset: Lightning sets it when imported, and with it every
    `torch.cuda.is_available()` (each optimizer step asks) loads NVML anew on a machine without a GPU, about
    0.2 ms a call. (The check exists to keep CUDA out of forked processes; the only ones a run forks, data
    loader workers, use no CUDA.)"""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    saved = {name: os.environ.get(name) for name in ("WANDB_MODE", NVML_CHECK)}
    os.environ.pop(NVML_CHECK, None)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with resolvers():
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        restore_environment(saved)


def set_environment(**values: str) -> dict[str, str | None]:
    """Set these environment variables; returns what they were before (None: unset), for `restore_environment`."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return saved


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put back the variables `set_environment` changed, and only those."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def seed_and_switches(cfg: DictConfig) -> None:
    """Seed every generator and set torch's determinism switches for one rank's work (`run_scope` restores the
    switches). Without torch's NaN fill of every new tensor under deterministic algorithms: it guards only
    kernels that read memory they did not write, and costs a pass over every temporary (in DC, each over the
    whole calibration set)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic), warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run, with one line saying what the run saved and how to resume it (`pdq` prints
    it and exits with status 130)."""


class _Stop(BaseException):
    """Raised by `interrupts_as`'s SIGINT handler. Not a KeyboardInterrupt, which Lightning's fit turns into
    sys.exit(1) (and ignores Ctrl-C from then on): a BaseException goes through Lightning's teardown and on, as
    through every `except Exception` on the way."""


@contextlib.contextmanager
def interrupts_as(message: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside the block ends it with `Interrupted(message())`, wherever it came (a unit's fit included).
    The SIGINT handler is this process's for the block only, in the main thread only (where Python runs signal
    handlers); not where SIGINT is ignored (a background job); a process forked inside the block (a data loader
    worker) gets Python's usual KeyboardInterrupt; a second Ctrl-C while the first is handled too."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield
        return
    owner = os.getpid()

    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.getpid() != owner:
            raise KeyboardInterrupt
        raise _Stop

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    except (_Stop, KeyboardInterrupt):
        raise Interrupted(message()) from None
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
