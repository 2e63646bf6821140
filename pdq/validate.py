"""The cheap checks of a run's config and inputs, before anything heavy is loaded: every bad value ends in one
`PdqError` that names it and what is accepted."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pdq.checks import check_bool, check_choice, check_int, flatten
from pdq.distributed import world_size_of
from pdq.errors import PdqError, instantiate
from pdq.models.registry import check_model_config
from pdq.quant.layout import BitLayout
from pdq.recon.store import CACHE_DEVICES
from pdq.resume import STATE_FILE

#: the config groups whose numbers must be finite (the other groups check their own values)
CHECKED_GROUPS = ("calib", "data", "trainer")
SEED_MAX = 2 ** 32 - 1
CACHE_DTYPES = ("float32", "float16", "bfloat16")
#: what a data module's missing `data.root` must hold
ROOT_HINTS = {"pdq.data.ImageNetDataModule": "data=imagenet needs data.root=PATH; accepted: a folder holding train/ "
                                             "and val/ class folders",
              "pdq.data.FolderDataModule": "data=folder needs data.root=PATH; accepted: a folder of calibration "
                                           "images (at any depth)"}


def missing_keys(node, prefix: str = "") -> list[str]:
    """The `???` values of a config, without resolving its interpolations."""
    found = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            found.append(name)
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            found += missing_keys(child, f"{name}.")
    return found


def check_numbers_finite(cfg: DictConfig) -> None:
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        for key, value in flatten(OmegaConf.to_container(node, resolve=True), group).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise PdqError(f"{key}={value} is not accepted; accepted: a finite number")


def check_calib(calib: DictConfig) -> None:
    check_choice("calib.cache_dtype", calib.cache_dtype, CACHE_DTYPES)
    check_bool("calib.channels_last", calib.channels_last)
    if calib.cache_device not in CACHE_DEVICES:
        raise PdqError(f"calib.cache_device={calib.cache_device!r} is not accepted; accepted: null (the compute "
                       f"device), {', '.join(d for d in CACHE_DEVICES if d)}")
    for key in ("size", "batch_size", "act_init_size"):
        value = calib[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PdqError(f"calib.{key}={value!r} is not accepted; accepted: a positive integer")
    for key in ("batch_size", "act_init_size"):
        if calib[key] > calib.size:
            raise PdqError(f"calib.{key}={calib[key]} is larger than calib.size={calib.size} "
                           f"(the calibration set); accepted: 1..{calib.size}")


def validate(cfg: DictConfig, check_model: bool = True) -> BitLayout:
    """Cheap checks of every user value, before anything heavy is loaded (`check_model=False`: the model
    is given as an object, not by its config); returns the run's bit layout."""
    missing = missing_keys(cfg)
    if missing:
        key = missing[0]
        hint = ROOT_HINTS.get(cfg.data.get("_target_")) if key == "data.root" else None
        raise PdqError(f"{key} is not set and has no default; "
                       + (hint or f"accepted: {key}=<value> on the command line"))
    check_numbers_finite(cfg)
    if check_model:
        check_model_config(cfg.model)
    if cfg.model.get("checkpoint") and not Path(cfg.model.checkpoint).expanduser().is_file():
        raise PdqError(f"model.checkpoint={cfg.model.checkpoint!r} does not exist "
                       f"(accepted: a readable checkpoint file)")
    check_calib(cfg.calib)
    check_bool("keep_freed_memory", cfg.keep_freed_memory)
    check_bool("plan_only", cfg.plan_only)
    for key, value in cfg.memory_limit_mib.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise PdqError(f"memory_limit_mib.{key}={value!r} is not accepted; accepted: null (what is available) "
                           f"or a positive number of MiB")
    check_int("seed", cfg.seed, 0, SEED_MAX)
    if cfg.resume not in (None, "auto"):
        run_dir = Path(cfg.resume).expanduser()
        if not (run_dir / STATE_FILE).is_file() and not (run_dir / "results.json").is_file():
            raise PdqError(f"resume={cfg.resume!r} holds neither {STATE_FILE} nor results.json; accepted: the run "
                           f"dir of an interrupted (or finished) reconstruction run, or auto")
    layout = instantiate(cfg.quant, _convert_="all")
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PdqError(f"trainer.accelerator={accelerator!r} but no CUDA device is visible; accepted here: cpu")
    world = world_size_of(cfg.trainer)
    for key in ("size", "batch_size"):  # equal shards of the calibration set and of every step's batch
        if cfg.calib[key] % world:
            raise PdqError(f"calib.{key}={cfg.calib[key]} does not split evenly over {world} processes "
                           f"(trainer.devices x trainer.num_nodes); accepted: a multiple of {world}")
    return layout
