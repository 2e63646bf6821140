"""One pdq run: check the config and every cheap input, build the model and its quantized graph, load the data,
evaluate FP, quantize, evaluate, write results.json, then finish the logger.

Bad input ends in one `PdqError` before any heavy work: the config values, the run dir (writable), the
logger (credentials, started), a resumed run's saved state, the checkpoint (loads, finite weights) and the
per-layer layout (resolved on the quantized graph) are all checked before the data is loaded."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import math
import netrc
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
import torchvision
from omegaconf import DictConfig, ListConfig, OmegaConf

import pdq
from pdq.checks import check_bool, check_int, flatten
from pdq.config import resolvers
from pdq.context import RunContext
from pdq.distributed import SINGLE, Dist, state_sha256, world_size_of
from pdq.errors import PdqError, cause, instantiate
from pdq.evaluate import evaluate
from pdq.export.checkpoint import INT_FILE, model_identity, save_int
from pdq.export.onnx import OnnxExport
from pdq.io import atomic_torch_save, atomic_write_json
from pdq.launch import session
from pdq.mixed import MixedLayout
from pdq.mixed.sensitivity import model_cost
from pdq.models.registry import check_input, check_model_config
from pdq.quant import apply_layout, quantize_model
from pdq.quant.graph import integer_plan
from pdq.quant.layout import BitLayout
from pdq.recon.engine import STATE_FILE
from pdq.resume import (
    begin_part,
    fingerprint,
    finished_results,
    keep_earlier_metrics,
    load_resume_state,
    merge_metrics,
    records_in,
    resume_dir,
)

log = logging.getLogger("pdq")
#: their INFO lines (one set per unit's fit) drown pdq's own; quietened for the duration of a run
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
#: the config groups whose numbers must be finite (the other groups check their own values)
CHECKED_GROUPS = ("calib", "data", "trainer")
SEED_MAX = 2 ** 32 - 1
#: unset during a run (see `run_scope`)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
#: what a data module's missing `data.root` must hold
ROOT_HINTS = {"pdq.data.ImageNetDataModule": "data=imagenet needs data.root=PATH; accepted: a folder holding train/ "
                                             "and val/ class folders",
              "pdq.data.FolderDataModule": "data=folder needs data.root=PATH; accepted: a folder of calibration "
                                           "images (at any depth)"}


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """The process-wide settings a run changes, restored after it (so that a run leaves its process, e.g. the
    next job of a sequential multirun or a test session, as it found it): the Lightning log levels, torch's
    deterministic-algorithms switches, WANDB_MODE (Lightning's offline WandbLogger sets it), and pdq's OmegaConf
    resolvers (registered for the run only). During the run PYTORCH_NVML_BASED_CUDA_CHECK is unset: Lightning sets
    it when imported, and with it every `torch.cuda.is_available()` (each optimizer step asks) loads NVML anew on
    a machine without a GPU, about 0.2 ms a call. (The check exists to keep CUDA out of forked processes; the only
    ones a run forks, data loader workers, use no CUDA.)"""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    wandb_mode = os.environ.get("WANDB_MODE")
    nvml_check = os.environ.pop(NVML_CHECK, None)
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
        for var, value in (("WANDB_MODE", wandb_mode), (NVML_CHECK, nvml_check)):
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _missing_keys(node, prefix: str = "") -> list[str]:
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
            found += _missing_keys(child, f"{name}.")
    return found


def check_numbers_finite(cfg: DictConfig) -> None:
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        for key, value in flatten(OmegaConf.to_container(node, resolve=True), group).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise PdqError(f"{key}={value} is not accepted; accepted: a finite number")


def validate(cfg: DictConfig, check_model: bool = True) -> BitLayout:
    """Cheap checks of every user value, before anything heavy is loaded (`check_model=False`: the model
    is given as an object, not by its config)."""
    missing = _missing_keys(cfg)
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
    if cfg.calib.cache_dtype not in ("float32", "float16", "bfloat16"):
        raise PdqError(f"calib.cache_dtype={cfg.calib.cache_dtype!r} is not accepted; accepted: float32, float16, "
                       f"bfloat16")
    check_bool("calib.channels_last", cfg.calib.channels_last)
    check_bool("keep_freed_memory", cfg.keep_freed_memory)
    for key in ("size", "batch_size", "act_init_size"):
        value = cfg.calib[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PdqError(f"calib.{key}={value!r} is not accepted; accepted: a positive integer")
    for key in ("batch_size", "act_init_size"):
        if cfg.calib[key] > cfg.calib.size:
            raise PdqError(f"calib.{key}={cfg.calib[key]} is larger than calib.size={cfg.calib.size} "
                           f"(the calibration set); accepted: 1..{cfg.calib.size}")
    check_int("seed", cfg.seed, 0, SEED_MAX)
    if cfg.get("resume") not in (None, "auto"):
        run_dir = Path(cfg.resume).expanduser()
        if not (run_dir / STATE_FILE).is_file() and not (run_dir / "results.json").is_file():
            raise PdqError(f"resume={cfg.resume!r} holds neither {STATE_FILE} nor results.json; accepted: the run "
                           f"dir of an interrupted (or finished) reconstruction run, or auto")
    layout = instantiate(cfg.quant, _convert_="all")
    accelerator = cfg.trainer.get("accelerator", "cpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PdqError(f"trainer.accelerator={accelerator!r} but no CUDA device is visible; accepted here: cpu")
    world = world_size_of(cfg.trainer)
    for key in ("size", "batch_size"):  # equal shards of the calibration set and of every step's batch
        if cfg.calib[key] % world:
            raise PdqError(f"calib.{key}={cfg.calib[key]} does not split evenly over {world} processes "
                           f"(trainer.devices x trainer.num_nodes); accepted: a multiple of {world}")
    return layout


def resolve_device(cfg: DictConfig, dist: Dist = SINGLE) -> torch.device:
    accelerator = cfg.trainer.get("accelerator", "cpu")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def versions() -> dict[str, str]:
    return {"pdq": pdq.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": version("lightning")}


def check_writable(out_dir: Path) -> None:
    """The run dir takes a file now, not only at the end of the work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".pdq-write-check-") as f:
            f.write(b"pdq")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PdqError(f"the run dir {out_dir} cannot be written ({e.strerror or type(e).__name__}); accepted: a "
                       f"writable dir (hydra.run.dir=PATH, or resume= a writable run dir)") from None


def _wandb_credentials() -> bool:
    """W&B's own sources: WANDB_API_KEY, or an entry for its host in the netrc file (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(cfg: DictConfig) -> None:
    """An online W&B logger needs credentials: say so now, not when the first metric is logged."""
    logger = cfg.get("logger")
    if not logger or not str(logger.get("_target_", "")).endswith("WandbLogger"):
        return
    if logger.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return
    if not _wandb_credentials():
        raise PdqError("logger=wandb with logger.offline=false needs W&B credentials, and none were found "
                       "(WANDB_API_KEY unset, no api.wandb.ai entry in ~/.netrc); accepted: `wandb login` or "
                       "WANDB_API_KEY=..., or logger.offline=true (sync later with `wandb sync`), or logger=csv")


def start_logger(cfg: DictConfig, resumed: bool):
    """The run's logger, started before the work: a W&B run is initialised now."""
    logger = instantiate(cfg.logger)
    if type(logger).__name__ == "WandbLogger":
        try:
            logger.experiment  # noqa: B018  (wandb.init)
        except Exception as e:
            raise PdqError(f"logger=wandb could not start a W&B run ({cause(e)}); accepted: "
                           f"logger.offline=true, W&B credentials (wandb login), or logger=csv") from None
    if resumed:
        keep_earlier_metrics(logger)
    return logger


def run(cfg: DictConfig) -> dict:
    """One run from its config (`run.py`); returns results.json's content."""
    return execute(cfg)[0]


def execute(cfg: DictConfig, model: torch.nn.Module | None = None,
            datamodule=None) -> tuple[dict, torch.nn.Module | None]:
    """(results, quantized model) of one run; `model` and `datamodule`, when given (`pdq.quantize`), are used
    instead of building `cfg.model` and `cfg.data`. The model is None when a resumed run had finished."""
    t0 = time.time()
    with run_scope():
        layout = validate(cfg, check_model=model is None)
        if isinstance(layout, MixedLayout):  # a run allocates (pdq-sensitivity may only measure)
            layout.require_budget()
        done = finished_results(cfg)
        if done is not None:
            log.info("resume=%s: %s already holds this run's results.json (top-1 %s); nothing to do",
                     cfg.resume, resume_dir(cfg), done["quant_top1"])
            return done, None
        out_dir, resume_state = load_resume_state(cfg)
        job_dir = Path(cfg.paths.output_dir)
        if out_dir.resolve() != job_dir.resolve():  # every record of a resumed run goes into the run's own dir
            cfg = copy.deepcopy(cfg)
            OmegaConf.update(cfg, "paths.output_dir", str(out_dir))
        check_writable(out_dir)
        check_logger(cfg)
        method = instantiate(cfg.method)
        exporter = instantiate(cfg.export) if cfg.get("export") else None
        datamodule = datamodule if datamodule is not None else instantiate(cfg.data)
        datamodule.prepare_data()  # cheap: the files exist, split sizes
        if cfg.calib.size > datamodule.train_size:
            raise PdqError(f"calib.size={cfg.calib.size} is larger than the training split "
                           f"({datamodule.train_size} images); accepted: 1..{datamodule.train_size}")
        with records_in(out_dir, job_dir), session(cfg.trainer, out_dir) as dist:
            if resume_state is not None:
                log.info("resuming %s after %d finished units", out_dir, len(resume_state["units"]))
            try:
                return run_ranks(cfg, layout, method, datamodule, out_dir, resume_state, dist, t0, model, exporter)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    where = f" ({e.filename})" if e.filename else ""
                    raise PdqError(f"no space left to write into the run dir {out_dir}{where}: {e.strerror}; no "
                                   f"partial file was left (atomic writes); free space and run again "
                                   f"(resume={out_dir} continues a reconstruction run)") from None
                raise


def run_ranks(cfg: DictConfig, layout: BitLayout, method, datamodule, out_dir: Path, resume_state: dict | None,
              dist: Dist, t0: float, model: torch.nn.Module | None = None,
              exporter: OnnxExport | None = None) -> tuple[dict, torch.nn.Module]:
    """Everything after validation, on every rank of a DDP run (once without DDP). With `export=`, the model the
    run wrote is exported at its end (tried on the quantized graph first, before the heavy work)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic")), warn_only=True)
    # without torch's NaN fill of every new tensor under deterministic algorithms: it guards only kernels that
    # read memory they did not write, and costs a pass over every temporary (in DC, each over the whole set)
    torch.utils.deterministic.fill_uninitialized_memory = False
    device = resolve_device(cfg, dist)
    wall_before = begin_part(out_dir, resume_state is not None, t0) if dist.main else 0.0
    logger = start_logger(cfg, resume_state is not None) if cfg.get("logger") and dist.main else None  # rank 0 logs
    try:
        model = (model if model is not None else instantiate(cfg.model)).eval().to(device)
        # cheap: the per-layer layout is resolved before the data
        qmodel = quantize_model(model, backend=layout.backend).to(device)
        table = layout.resolve(qmodel)
        apply_layout(qmodel, table)
        datamodule.setup()
        sample = datamodule.calibration_set(1, cfg.seed)
        check_input(model, sample[0].to(device), datamodule.name)
        if exporter is not None and dist.main:
            exporter.check(qmodel, list(sample.shape[1:]), table)
        calib = None
        if isinstance(layout, MixedLayout):  # quant=mixed: per-layer widths from the sensitivity, then the method
            calib = datamodule.calibration_set(cfg.calib.size, cfg.seed)
            layout.choose(qmodel, calib.to(device), out_dir if dist.main else None,
                          {"calib_size": cfg.calib.size, "seed": cfg.seed}, cfg.paths.get("cache_dir"))
            table = layout.resolve(qmodel)
            apply_layout(qmodel, table)
        results = quantize_and_evaluate(cfg, layout, table, datamodule, model, qmodel, method, logger, device,
                                        out_dir, resume_state, dist, calib)
        results["wall_s"] = round(wall_before + time.time() - t0, 2)
        if dist.main:  # before the logger is finished: a logger failure never loses the results
            atomic_write_json(out_dir / "results.json", results)
            log.info("wrote %s", out_dir / "results.json")
        if exporter is not None and dist.main:
            exporter(out_dir, model)
    except BaseException:
        finish_logger(logger, ok=False)
        raise
    finish_logger(logger, ok=True)
    return results, qmodel


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory (Linux reports KiB) and, on a GPU, peak allocated memory."""
    peak = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return peak


def close_logger(logger, ok: bool) -> None:
    """Finish the run's logger; a W&B run is always finished, so each multirun job is its own run."""
    if logger is None:
        return
    logger.finalize("success" if ok else "failed")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish(exit_code=0 if ok else 1)


def finish_logger(logger, ok: bool) -> None:
    """close_logger, then a resumed CSV log's earlier rows put back. A failure after a successful run is one
    clear error (results.json is already written); after a failed run it is logged, not raised over the cause."""
    try:
        close_logger(logger, ok)
        merge_metrics(logger)
    except Exception as e:
        message = f"the logger ({type(logger).__name__}) failed to finish: {type(e).__name__}: {e}"
        if ok:
            raise PdqError(f"{message}; results.json is written") from None
        log.error("%s", message)


def fp_accuracy(cfg, model, test_loader, device, dist: Dist = SINGLE) -> float:
    """FP top-1, computed once per (model weights, data config) and kept in `paths.cache_dir` (null: no
    cache), so that the jobs of a sweep do not re-evaluate the same float model. Rank 0 reads and
    writes the cache; a miss is evaluated sharded over the ranks."""
    cache_dir = cfg.paths.get("cache_dir")
    path = None
    if cache_dir:
        h = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True).encode())
        h.update(str(len(test_loader.dataset)).encode())
        h.update(state_sha256(model).encode())
        path = Path(cache_dir) / "fp_top1" / f"{h.hexdigest()[:32]}.json"
        cached = dist.broadcast(float(json.loads(path.read_text())["fp_top1"]) if path.is_file() else None)
        if cached is not None:
            log.info("FP top-1: %.2f%% (cached in %s)", cached, path)
            return cached
    top1 = evaluate(model, test_loader, device, desc="FP eval", dist=dist)
    log.info("FP top-1: %.2f%%", top1)
    if path is not None and dist.main:
        atomic_write_json(path, {"fp_top1": top1, "model": cfg.model.name, "eval_images": len(test_loader.dataset)})
    return top1


def quantize_and_evaluate(cfg, layout, table, datamodule, model, qmodel, method, logger, device, out_dir,
                          resume_state, dist: Dist = SINGLE, calib: torch.Tensor | None = None) -> dict:
    """Quantize `qmodel` with `method` on the calibration set (`calib` when it was drawn already), evaluate, and
    write the model files; returns results.json's content (without wall_s)."""
    log.info("model=%s data=%s method=%s %s layout=%s seed=%d device=%s", cfg.model.name,
             datamodule.name, method.name, layout.label, layout.layout, cfg.seed, device)
    test_loader = datamodule.test_dataloader()
    if test_loader is None:
        log.info("data=%s has no evaluation set: top-1 is not measured", datamodule.name)
    fp_top1 = fp_accuracy(cfg, model, test_loader, device, dist) if test_loader is not None else None

    calib = calib if calib is not None else datamodule.calibration_set(cfg.calib.size, cfg.seed)
    ctx = RunContext(device=device, seed=cfg.seed, batch_size=cfg.calib.batch_size,
                     act_init_size=cfg.calib.act_init_size, cache_dtype=getattr(torch, cfg.calib.cache_dtype),
                     channels_last=cfg.calib.channels_last,
                     trainer=instantiate(cfg.trainer), logger=logger, out_dir=out_dir, resume_state=resume_state,
                     reconstruct_stem=layout.reconstruct_stem, fingerprint=fingerprint(cfg), fp_model=model,
                     dist=dist, cache_dir=cfg.paths.get("cache_dir"))
    plan = integer_plan(qmodel)
    log_integer_plan(plan)
    unit_table = method.unit_table(qmodel)
    log_unit_table(unit_table)
    t_q = time.time()
    units = method.quantize(qmodel, calib, ctx)
    quant_seconds = time.time() - t_q
    quant_top1 = None
    if test_loader is not None:
        quant_top1 = evaluate(qmodel, test_loader, device, desc="quant eval", dist=dist)
        log.info("%s %s top-1: %.2f%% (FP %.2f%%)", method.name, layout.label, quant_top1, fp_top1)

    results = {
        "model": cfg.model.name, "dataset": datamodule.name, "method": method.name,
        "w_bits": layout.w_bits, "a_bits": layout.a_bits, "seed": cfg.seed, "calib_size": cfg.calib.size,
        "iters": int(getattr(method, "iters", 0)), "components": method.components,
        "fp_top1": _round(fp_top1), "quant_top1": _round(quant_top1),
        "eval_images": len(test_loader.dataset) if test_loader is not None else 0,
        "quant_s": round(quant_seconds, 2), "versions": versions(),
        "unit_table": unit_table, "units": units, "layout": {"preset": layout.layout, **table},
        "backend": layout.backend, "integer_plan": plan,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results["cost"] = model_cost(qmodel, calib[:1].to(device), table)  # weight bits, MiB and BOPs (the report)
    if isinstance(layout, MixedLayout):
        results["mixed"] = {"budget": {layout.budget_key: layout.budget_value}}
    results["world_size"] = dist.world_size
    results["peak_mib_per_rank"] = dist.gather(peak_memory_mib(device))
    if dist.enabled:  # every rank must end with the same quantized model (all-reduced gradients)
        results["rank_state_sha256"] = dist.gather(state_sha256(qmodel))
        if len(set(results["rank_state_sha256"])) > 1:
            log.error("the ranks ended with different quantized models: %s", results["rank_state_sha256"])
    if dist.main:
        atomic_torch_save(qmodel.state_dict(), out_dir / "quantized_model.pt")
        results["sizes"] = write_int_checkpoint(cfg, model, qmodel, list(calib.shape[1:]), out_dir, results)
    if logger is not None and test_loader is not None:
        logger.log_metrics({"fp_top1": fp_top1, "quant_top1": quant_top1}, step=sum(u["iters"] for u in units))
    return results


def write_int_checkpoint(cfg, model, qmodel, input_shape: list[int], out_dir: Path, results: dict) -> dict:
    """Write the run's integer checkpoint; returns its size next to the float model's (bytes)."""
    identity = model_identity(OmegaConf.to_container(cfg.model, resolve=True), model)
    info = {key: results[key] for key in ("method", "w_bits", "a_bits", "seed", "quant_top1")}
    path = save_int(qmodel, out_dir / INT_FILE, identity=identity, input_shape=input_shape, info=info)
    sizes = {"fp32_state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
             "int_file_bytes": path.stat().st_size}
    log.info("wrote %s: %.1f KiB (float state dict: %.1f KiB)", path, sizes["int_file_bytes"] / 1024,
             sizes["fp32_state_bytes"] / 1024)
    return sizes


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def log_integer_plan(plan: dict) -> None:
    """What the backend's integer kernels will run (`pdq.quant.graph.integer_plan`), each float layer named."""
    total = len(plan["integer"]) + len(plan["float"])
    if plan["backend"] == "academic":
        log.info("backend=academic: the papers' placement and grids, a simulation (quant.backend=onnxruntime or "
                 "tensorrt quantizes for a runtime's integer kernels)")
        return
    log.info("backend=%s: integer kernels for %d of %d layers and adds", plan["backend"], len(plan["integer"]), total)
    for name, reason in plan["float"].items():
        log.info("  stays float: %s (%s)", name, reason)


def log_unit_table(rows: list[dict]) -> None:
    """The reconstruction units, one line each, and the warnings the table earns (`pdq.recon.units`)."""
    for pattern in dict.fromkeys(row["pattern"] for row in rows):
        mine = [row for row in rows if row["pattern"] == pattern]
        log.info("%d units (pattern=%s): name | found by | weight layers | activation quantizers", len(mine), pattern)
        for i, row in enumerate(mine):
            layers = ", ".join(row["layers"])
            log.info("  %2d %s | %s | %d: %s | %d", i, row["name"], row["source"], len(row["layers"]),
                     layers if len(layers) <= 100 else layers[:97] + "...", len(row["act_quants"]))
    for row in rows:
        for warning in row.get("warnings", []):
            log.warning("%s", warning)
