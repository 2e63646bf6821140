"""`pdq.quantize`: the run of the `pdq` command on a model and images given as Python objects.

    import pdq
    qmodel, results = pdq.quantize(model, images, method="pdquant", bits="w4a4", iters=200)

The config is composed from the same `conf/` as the `pdq` command (`method=`, `quant=` and any other group by
name, e.g. `trainer="gpu"`, `logger="wandb"`), with the overrides applied by the config's own names."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pdq.data.tensor import TensorDataModule
from pdq.errors import PdqError

#: config groups an override may select by name (`trainer="gpu"`, `export="onnx"`)
GROUPS = ("trainer", "logger", "export")
#: where a plain override name is looked up (`drop_prob` -> method.drop_prob, `size` -> calib.size)
SEARCH = ("", "method.", "calib.", "quant.", "model.ptq.")
#: images per batch when `eval_data` is a Dataset or an (images, labels) pair
EVAL_BATCH_SIZE = 256
log = logging.getLogger("pdq")


def as_images(calib) -> torch.Tensor:
    """A [N, C, H, W] float tensor from a tensor, a Dataset or a DataLoader (of images or (image, label) pairs)."""
    if isinstance(calib, DataLoader):
        images = torch.cat([batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calib])
    elif isinstance(calib, Dataset):
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item
                              for item in (calib[i] for i in range(len(calib)))])
    else:
        images = calib
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point() or not len(images):
        what = f"a {images.dtype} tensor of shape {list(images.shape)}" if isinstance(images, torch.Tensor) \
            else type(images).__name__
        raise PdqError(f"calib is {what}; accepted: float images [N, C, H, W] (N >= 1) as a tensor, a Dataset or a "
                       f"DataLoader (of images or (image, label) pairs)")
    if not torch.isfinite(images).all():
        raise PdqError("calib holds NaN or inf values; accepted: finite images")
    return images.float()


def as_eval_loader(eval_data) -> DataLoader | None:
    """`eval_data` as a loader of (images, labels) batches: a DataLoader as it is, a Dataset of (image, label)
    pairs or an (images, labels) pair of tensors in batches of `EVAL_BATCH_SIZE`; a bare tensor has no labels."""
    if eval_data is None or isinstance(eval_data, DataLoader):
        return eval_data
    pair = isinstance(eval_data, (tuple, list)) and len(eval_data) == 2 and all(
        isinstance(t, torch.Tensor) and t.ndim for t in eval_data)
    if pair and len(eval_data[0]) == len(eval_data[1]):
        eval_data = TensorDataset(*eval_data)
    if isinstance(eval_data, Dataset):
        return DataLoader(eval_data, batch_size=EVAL_BATCH_SIZE)
    what = (f"a {eval_data.dtype} tensor of shape {list(eval_data.shape)} (images without labels)"
            if isinstance(eval_data, torch.Tensor) else f"a {type(eval_data).__name__}")
    raise PdqError(f"eval_data is {what}; accepted: a DataLoader of (images, labels) batches, a Dataset of "
                   f"(image, label) pairs, an (images, labels) pair of tensors of equal length, or None (no "
                   f"evaluation)")


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """The train/eval mode of `model` and of each of its submodules as they were, on every way out."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _node(cfg: DictConfig, key: str):
    """The node of the dotted `key` in `cfg` (its interpolation unresolved), or None where there is none."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _follows(cfg: DictConfig, key: str) -> str | None:
    """The key whose value `key` takes whole (`method.iters: ${model.ptq.iters}` follows model.ptq.iters)."""
    node = _node(cfg, key)
    found = re.fullmatch(r"\$\{([\w.]+)\}", str(node._value())) if node._is_interpolation() else None
    return found.group(1) if found else None


def resolve_key(cfg: DictConfig, key: str) -> str:
    """The config key an override names: a dotted key as it is; a plain name looked up under each of `SEARCH`
    and as `<group>_<key>` (calib_size -> calib.size). A plain name found at several keys names one setting only
    where the others follow one of them (`iters`: method.iters follows model.ptq.iters, which is set); otherwise it
    is ambiguous, and an error. The key a plain name resolved to is logged."""
    head, _, rest = key.partition("_")
    candidates = [key] if "." in key else [*(p + key for p in SEARCH), *([f"{head}.{rest}"] if rest else [])]
    found = [c for c in candidates if _node(cfg, c) is not None]
    if not found:
        raise PdqError(f"quantize(..., {key}=...): {key!r} is no setting of the composed config; accepted: a dotted "
                       f"key (method.drop_prob, calib.batch_size, ...), a name found under {', '.join(SEARCH[1:])} "
                       f"(iters, drop_prob, ...), <group>_<key> (calib_size), or a config group ({', '.join(GROUPS)})")
    if "." in key:
        return key

    def source(candidate: str) -> str:
        for _ in found:  # a step per candidate at most: a cycle of interpolations ends too
            if _follows(cfg, candidate) not in found:
                break
            candidate = _follows(cfg, candidate)
        return candidate

    sources = sorted({source(c) for c in found})
    if len(sources) > 1:
        raise PdqError(f"quantize(..., {key}=...): {key!r} names {len(sources)} different settings "
                       f"({', '.join(found)}); accepted: the dotted key of the one meant, e.g. "
                       f"**{{{found[0]!r}: ...}} or {found[0].replace('.', '__')}=...")
    followers = [c for c in found if c != sources[0]]
    log.info("quantize(..., %s=...) sets %s%s", key, sources[0],
             f" (followed by {', '.join(followers)})" if followers else "")
    return sources[0]


def compose(method: str, bits: str, overrides: dict) -> tuple[DictConfig, set[str]]:
    """The composed config of the `pdq` command for `method` and `bits` with `overrides`, and the keys they set."""
    from hydra.errors import HydraException

    from pdq.config import compose as compose_config

    groups = [f"{key}={overrides[key]}" for key in GROUPS if key in overrides]
    try:
        cfg = compose_config([f"method={method}", f"quant={bits}", "model=custom", *groups])
    except HydraException as e:
        raise PdqError(f"quantize(method={method!r}, bits={bits!r}, ...): {str(e).splitlines()[0]}") from None
    keys = set()
    for key, value in overrides.items():
        if key in GROUPS:
            continue
        path = resolve_key(cfg, key)
        OmegaConf.update(cfg, path, value, merge=False)
        keys.add(path)
    return cfg, keys


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """pdq's INFO lines on stderr for the call, when the application has not configured logging itself."""
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def quantize(model: nn.Module, calib, *, method: str = "pdquant", bits: str = "w4a4", out_dir: str | Path | None = None,
             eval_data: DataLoader | Dataset | tuple | None = None, **overrides) -> tuple[nn.Module, dict]:
    """Quantize `model` with `method` at `bits` (a `conf/quant` name: w4a4, w2a4, ...) from the calibration
    images `calib` (a [N, C, H, W] tensor, a Dataset or a DataLoader): the same engine, defaults, progress
    and logging as the `pdq` command. `overrides` use the config's names: `iters=200`, `calib_size=512`, `seed=0`,
    `method.drop_prob=0.5`, `trainer="gpu"`, `backend="onnxruntime"` (quant.backend: the quantizers and grids of
    a runtime's integer kernels, `pdq.quant.backends`); an unknown name is an error. By default every given image is
    calibration data (calib.size = N, and batch / activation-init sizes at most N). `eval_data` (a DataLoader
    of (images, labels) batches, a Dataset of (image, label) pairs or an (images, labels) pair of tensors) adds FP
    and quantized top-1. The model's train/eval modes are left as they were. The files of a run (results.json,
    quantized_model.pt, quantized_int.safetensors, the CSV log; quantized_model.onnx with export="onnx") go to
    `out_dir`, or to a temporary dir removed afterwards.
    Returns (the quantized torch.fx.GraphModule, the results dict of results.json)."""
    from pdq.distributed import world_size_of
    from pdq.pipeline import execute
    from pdq.process import Interrupted

    if not isinstance(model, nn.Module):
        raise PdqError(f"model is {type(model).__name__}; accepted: a torch.nn.Module")
    images = as_images(calib)
    eval_loader = as_eval_loader(eval_data)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_console_logging())  # pdq's lines: the keys plain names resolve to, the run's progress
        cfg, keys = compose(method, bits, {k.replace("__", "."): v for k, v in overrides.items()})
        if world_size_of(cfg.trainer) > 1:
            raise PdqError("pdq.quantize runs in this one process; accepted: trainer.devices=1 (multi-GPU and "
                           "multi-node runs go through `pdq trainer=ddp`)")
        n = len(images)
        with open_dict(cfg):
            cfg.model.name = type(model).__name__
            cfg.data = {"name": TensorDataModule.name, "images": n, "image_shape": list(images.shape[1:])}
            cfg.paths.cache_dir = None
            if "calib.size" not in keys:
                cfg.calib.size = n
            for key in ("batch_size", "act_init_size"):
                if f"calib.{key}" not in keys:
                    cfg.calib[key] = min(cfg.calib[key], cfg.calib.size)
        run_dir = out_dir if out_dir is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="pdq-"))
        cfg.paths.output_dir = str(Path(run_dir).expanduser())
        stack.enter_context(_modes_kept(model))
        try:
            results, qmodel = execute(cfg, model=model, datamodule=TensorDataModule(images, eval_loader))
        except Interrupted:
            if out_dir is None:  # the temporary dir goes with the saved state
                raise Interrupted("interrupted; nothing kept to resume from (without out_dir=, pdq.quantize "
                                  "writes into a temporary dir)") from None
            raise
    return qmodel, results
