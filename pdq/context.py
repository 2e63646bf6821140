"""What every quantization method gets besides the model and the calibration images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from pdq.distributed import SINGLE, Dist
from pdq.recon.store import CacheStore


@dataclass(kw_only=True)
class RunContext:
    """The run's settings come from the config (conf/config.yaml `calib.*` and `seed`, quant.layout's preset):
    no defaults here. What has one is a run's object (trainer, logger, dirs, saved state, ...). The logging
    cadence is the trainer's (conf/trainer `log_every_n_steps`)."""
    device: torch.device
    seed: int                         # seed
    batch_size: int                   # calib.batch_size: reconstruction and caching batch
    act_init_size: int                # calib.act_init_size: images that initialise activation quantizers
    cache_dtype: torch.dtype          # calib.cache_dtype
    channels_last: bool               # calib.channels_last: reconstruct image models in channels-last layout
    reconstruct_stem: bool            # quant.layout's preset: the `brecq` layout leaves the first unit as it is
    trainer: Callable[..., L.Trainer] | None = None   # partial Trainer (conf/trainer)
    logger: object | None = None      # Lightning logger shared by every unit's fit
    out_dir: Path | None = None       # where the per-unit state is saved
    resume_state: dict | None = None  # a saved state to continue from
    fingerprint: dict | None = None   # what a resumed run must share with the saved one
    fp_model: torch.nn.Module | None = None  # the unfolded float model (Distribution Correction)
    dist: Dist = SINGLE               # this process's rank in a DDP run (batch_size is the global batch)
    cache_dir: Path | None = None     # paths.cache_dir: results that depend only on the float model and data (DC)
    store: CacheStore | None = None   # calib.cache_device: where the per-unit caches live (None: the device)


def stream_seed(seed: int, *keys: int) -> int:
    """A reproducible 63-bit seed for (seed, phase, unit, stream): no hash(), which varies per process."""
    value = int(seed) & 0xFFFFFFFF
    for k in keys:
        value = (value * 1_000_003 + int(k) + 1) % (2 ** 63 - 1)
    return value


def resolve_device(cfg, dist: Dist = SINGLE) -> torch.device:
    """The device of this rank's work: its local GPU under `trainer.accelerator=gpu` (or `auto` with one
    visible), else the CPU."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")
