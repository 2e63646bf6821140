"""One pdq run: check the config and every cheap input, build the model and its quantized graph, load the data,
evaluate FP, quantize, evaluate, write results.json, then finish the logger.

Bad input ends in one `PdqError` before any heavy work: the config values, the run dir (writable), the
logger (credentials, started), a resumed run's saved state, the checkpoint (loads, finite weights) and the
per-layer layout (resolved on the quantized graph) are all checked before the data is loaded."""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import hashlib
import io
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
from pdq.checks import check_int
from pdq.config import resolvers
from pdq.context import RunContext
from pdq.distributed import SINGLE, Dist, session, state_sha256, world_size_of
from pdq.errors import PdqError, instantiate
from pdq.evaluate import evaluate
from pdq.io import atomic_torch_save, atomic_write, atomic_write_json
from pdq.models import check_model_name
from pdq.quant import apply_layout, quantize_model
from pdq.quant.layout import BitLayout
from pdq.recon.engine import STATE_FILE

log = logging.getLogger("pdq")
#: their INFO lines (one set per unit's fit) drown pdq's own; quietened for the duration of a run
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
#: the accumulated wall time of a run's earlier parts (a resumed run is the sum of its parts)
WALL_FILE = "wall_time.json"
#: where a resumed run keeps the CSV rows of its earlier parts while Lightning's CSVLogger writes a new file
EARLIER_METRICS = ".metrics_earlier.csv"
#: the config groups whose numbers must be finite (the other groups check their own values)
CHECKED_GROUPS = ("calib", "data", "trainer")
SEED_MAX = 2 ** 32 - 1
MISSING_HINTS = {"data.root": "data=imagenet needs data.root=PATH; accepted: a folder holding train/ and val/ class "
                              "folders"}


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """The process-wide settings a run changes, restored after it (so that a run leaves its process, e.g. the
    next job of a sequential multirun or a test session, as it found it): the Lightning log levels, torch's
    deterministic-algorithms switch, WANDB_MODE (Lightning's offline WandbLogger sets it), and pdq's OmegaConf
    resolvers (registered for the run only)."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    wandb_mode = os.environ.get("WANDB_MODE")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with resolvers():
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if wandb_mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode


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


def _flatten(obj, prefix: str) -> dict:
    """{'a.b.c': value} for every leaf of a nested dict (an empty dict is a leaf)."""
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def check_numbers_finite(cfg: DictConfig) -> None:
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        for key, value in _flatten(OmegaConf.to_container(node, resolve=True), group).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise PdqError(f"{key}={value} is not accepted; accepted: a finite number")


def validate(cfg: DictConfig) -> BitLayout:
    """Cheap checks of every user value, before anything heavy is loaded."""
    missing = _missing_keys(cfg)
    if missing:
        key = missing[0]
        raise PdqError(f"{key} is not set and has no default; "
                       + MISSING_HINTS.get(key, f"accepted: {key}=<value> on the command line"))
    check_numbers_finite(cfg)
    check_model_name(cfg.model.name)
    if cfg.model.get("checkpoint") and not Path(cfg.model.checkpoint).expanduser().is_file():
        raise PdqError(f"model.checkpoint={cfg.model.checkpoint!r} does not exist "
                       f"(accepted: a readable checkpoint file)")
    if cfg.calib.cache_dtype not in ("float32", "float16", "bfloat16"):
        raise PdqError(f"calib.cache_dtype={cfg.calib.cache_dtype!r} is not accepted; accepted: float32, float16, "
                       f"bfloat16")
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


def fingerprint(cfg: DictConfig) -> dict:
    """The settings a resumed run must share with the interrupted one: everything that changes the result,
    the trainer (process count, accelerator, determinism) included."""
    keep = ("model", "data", "method", "quant", "calib", "seed", "trainer")
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(keep)), resolve=True)


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def settings_diff(saved: dict | None, cfg: DictConfig, limit: int = 8) -> list[str]:
    """The settings in which `saved` (a fingerprint, or a results.json config) differs from this run's config,
    each as `key: <saved> (saved) vs <now> (now)`."""
    saved, now = saved or {}, fingerprint(cfg)
    diffs = []
    for group in now:
        if group not in saved:
            diffs.append(f"{group}: not recorded (saved) vs {_show(now[group])} (now)")
            continue
        a, b = _flatten(saved[group], group), _flatten(now[group], group)
        for key in sorted(a.keys() | b.keys()):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append(f"{key}: {_show(a.get(key, '<absent>'))} (saved) vs {_show(b.get(key, '<absent>'))} (now)")
    if len(diffs) > limit:
        diffs = [*diffs[:limit], f"... and {len(diffs) - limit} more"]
    return diffs


def resume_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir if cfg.resume == "auto" else cfg.resume).expanduser()


def finished_results(cfg: DictConfig) -> dict | None:
    """With `resume=auto` or `resume=<dir>`: the `results.json` already in that dir, when the same settings
    made it (the run is finished: nothing to do, and the file is left as it is)."""
    if not cfg.get("resume"):
        return None
    path = resume_dir(cfg) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PdqError(f"resume={cfg.resume}: {path} is not valid JSON ({e}); remove it to run this job "
                       f"again") from None
    diff = settings_diff(results.get("config") if isinstance(results, dict) else None, cfg)
    if diff:
        raise PdqError(f"resume={cfg.resume}: {path} holds the results of other settings ({'; '.join(diff)}); "
                       f"give this run another dir (hydra.run.dir / hydra.sweep.dir) or remove that one")
    return results


def read_state(path: Path, resume: str) -> dict:
    """A saved reconstruction state, or one clear error when the file is cut short, empty or not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise PdqError(f"resume={resume}: {path} is truncated or corrupt ({type(e).__name__}"
                       f"{': ' + detail if detail else ''}); remove it to start this run afresh") from None
    if not isinstance(state, dict) or not {"units", "state_dict", "fingerprint"} <= state.keys():
        raise PdqError(f"resume={resume}: {path} is not a saved reconstruction state (no units, state_dict and "
                       f"fingerprint); remove it to start this run afresh")
    return state


def load_resume_state(cfg: DictConfig) -> tuple[Path, dict | None]:
    """(output dir, saved state or None). A resumed run writes into the interrupted run's dir; `resume=auto`
    resumes from this run's own dir when it holds a saved state, and starts afresh otherwise."""
    if not cfg.get("resume"):
        return Path(cfg.paths.output_dir), None
    run_dir = resume_dir(cfg)
    if cfg.resume == "auto" and not (run_dir / STATE_FILE).is_file():
        return run_dir, None
    state = read_state(run_dir / STATE_FILE, cfg.resume)
    diff = settings_diff(state.get("fingerprint"), cfg)
    if diff:
        raise PdqError(f"resume={cfg.resume}: the interrupted run in {run_dir} was made with other settings "
                       f"({'; '.join(diff)}); resume with the interrupted run's overrides")
    return run_dir, state


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
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise PdqError(f"logger=wandb could not start a W&B run ({type(e).__name__}: {detail}); accepted: "
                           f"logger.offline=true, W&B credentials (wandb login), or logger=csv") from None
    if resumed:
        keep_earlier_metrics(logger)
    return logger


def _metrics_files(logger) -> tuple[Path, Path] | None:
    log_dir = getattr(logger, "log_dir", None)
    if type(logger).__name__ != "CSVLogger" or not log_dir:
        return None
    return Path(log_dir) / "metrics.csv", Path(log_dir).parent / EARLIER_METRICS


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def keep_earlier_metrics(logger) -> None:
    """Lightning's CSVLogger deletes the metrics.csv it finds in its dir. A resumed run first moves the rows of
    the interrupted part aside (after those of still earlier parts); `merge_metrics` puts them back in front."""
    files = _metrics_files(logger)
    if files is None or not files[0].is_file():
        return
    current, earlier = files
    rows, fields = _read_csv(earlier) if earlier.is_file() else ([], [])
    more, more_fields = _read_csv(current)
    _write_csv(earlier, rows + more, sorted(set(fields) | set(more_fields)))
    current.unlink()


def merge_metrics(logger) -> None:
    files = _metrics_files(logger)
    if files is None or not files[1].is_file():
        return
    current, earlier = files
    rows, fields = _read_csv(earlier)
    more, more_fields = _read_csv(current) if current.is_file() else ([], [])
    _write_csv(current, rows + more, sorted(set(fields) | set(more_fields)))
    earlier.unlink()


@contextlib.contextmanager
def records_in(out_dir: Path, job_dir: Path) -> Iterator[None]:
    """A run resumed in another run's dir logs there too: Hydra's log file is in this job's own new dir, so
    each of its file handlers gets a twin appending to the same file name in `out_dir`."""
    root, added = logging.getLogger(), []
    if out_dir.resolve() != job_dir.resolve():
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == job_dir.resolve():
                twin = logging.FileHandler(out_dir / Path(handler.baseFilename).name, mode="a")
                twin.setFormatter(handler.formatter)
                twin.setLevel(handler.level)
                root.addHandler(twin)
                added.append(twin)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def begin_part(out_dir: Path, resumed: bool, t0: float) -> float:
    """Record this part's start in WALL_FILE and return the wall seconds of the run's earlier parts: each
    interrupted part counts from its start to its last saved unit (the save time of STATE_FILE)."""
    path, before = out_dir / WALL_FILE, 0.0
    if resumed:
        try:
            record = json.loads(path.read_text())
            saved_at = (out_dir / STATE_FILE).stat().st_mtime
            before = float(record["before_s"]) + max(0.0, saved_at - float(record["started"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s could not be read (%s): wall_s counts this part only", path, type(e).__name__)
    atomic_write_json(path, {"before_s": round(before, 3), "started": t0})
    return before


def run(cfg: DictConfig) -> dict:
    t0 = time.time()
    with run_scope():
        layout = validate(cfg)
        done = finished_results(cfg)
        if done is not None:
            log.info("resume=%s: %s already holds this run's results.json (top-1 %.2f%%); nothing to do",
                     cfg.resume, resume_dir(cfg), done["quant_top1"])
            return done
        out_dir, resume_state = load_resume_state(cfg)
        job_dir = Path(cfg.paths.output_dir)
        if out_dir.resolve() != job_dir.resolve():  # every record of a resumed run goes into the run's own dir
            cfg = copy.deepcopy(cfg)
            OmegaConf.update(cfg, "paths.output_dir", str(out_dir))
        check_writable(out_dir)
        check_logger(cfg)
        method = instantiate(cfg.method)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()  # cheap: the files exist, split sizes
        if cfg.calib.size > datamodule.train_size:
            raise PdqError(f"calib.size={cfg.calib.size} is larger than the training split "
                           f"({datamodule.train_size} images); accepted: 1..{datamodule.train_size}")
        with records_in(out_dir, job_dir), session(cfg.trainer, out_dir) as dist:
            if resume_state is not None:
                log.info("resuming %s after %d finished units", out_dir, len(resume_state["units"]))
            try:
                return run_ranks(cfg, layout, method, datamodule, out_dir, resume_state, dist, t0)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    where = f" ({e.filename})" if e.filename else ""
                    raise PdqError(f"no space left to write into the run dir {out_dir}{where}: {e.strerror}; no "
                                   f"partial file was left (atomic writes); free space and run again "
                                   f"(resume={out_dir} continues a reconstruction run)") from None
                raise


def run_ranks(cfg: DictConfig, layout: BitLayout, method, datamodule, out_dir: Path, resume_state: dict | None,
              dist: Dist, t0: float) -> dict:
    """Everything after validation, on every rank of a DDP run (once without DDP)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic")), warn_only=True)
    device = resolve_device(cfg, dist)
    wall_before = begin_part(out_dir, resume_state is not None, t0) if dist.main else 0.0
    logger = start_logger(cfg, resume_state is not None) if cfg.get("logger") and dist.main else None  # rank 0 logs
    try:
        model = instantiate(cfg.model).to(device)
        qmodel = quantize_model(model).to(device)  # cheap: the per-layer layout is resolved before the data
        table = layout.resolve(qmodel)
        apply_layout(qmodel, table)
        datamodule.setup()
        results = quantize_and_evaluate(cfg, layout, table, datamodule, model, qmodel, method, logger, device,
                                        out_dir, resume_state, dist)
        results["wall_s"] = round(wall_before + time.time() - t0, 2)
        if dist.main:  # before the logger is finished: a logger failure never loses the results
            atomic_write_json(out_dir / "results.json", results)
            log.info("wrote %s", out_dir / "results.json")
    except BaseException:
        finish_logger(logger, ok=False)
        raise
    finish_logger(logger, ok=True)
    return results


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
                          resume_state, dist: Dist = SINGLE) -> dict:
    log.info("model=%s data=%s method=%s W%dA%d layout=%s seed=%d device=%s", cfg.model.name,
             datamodule.name, method.name, layout.w_bits, layout.a_bits, layout.layout, cfg.seed, device)
    test_loader = datamodule.test_dataloader()
    fp_top1 = fp_accuracy(cfg, model, test_loader, device, dist)

    calib = datamodule.calibration_set(cfg.calib.size, cfg.seed)
    ctx = RunContext(device=device, seed=cfg.seed, batch_size=cfg.calib.batch_size,
                     act_init_size=cfg.calib.act_init_size, cache_dtype=getattr(torch, cfg.calib.cache_dtype),
                     trainer=instantiate(cfg.trainer), logger=logger, out_dir=out_dir, resume_state=resume_state,
                     reconstruct_stem=layout.reconstruct_stem, fingerprint=fingerprint(cfg), fp_model=model,
                     dist=dist)
    t_q = time.time()
    units = method.quantize(qmodel, calib, ctx)
    quant_seconds = time.time() - t_q
    quant_top1 = evaluate(qmodel, test_loader, device, desc="quant eval", dist=dist)
    log.info("%s W%dA%d top-1: %.2f%% (FP %.2f%%)", method.name, layout.w_bits, layout.a_bits, quant_top1, fp_top1)

    results = {
        "model": cfg.model.name, "dataset": datamodule.name, "method": method.name,
        "w_bits": layout.w_bits, "a_bits": layout.a_bits, "seed": cfg.seed, "calib_size": cfg.calib.size,
        "iters": int(getattr(method, "iters", 0)), "components": method.components,
        "fp_top1": round(fp_top1, 4), "quant_top1": round(quant_top1, 4),
        "eval_images": len(test_loader.dataset),
        "quant_s": round(quant_seconds, 2), "versions": versions(),
        "units": units, "layout": {"preset": layout.layout, **table},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results["world_size"] = dist.world_size
    results["peak_mib_per_rank"] = dist.gather(peak_memory_mib(device))
    if dist.enabled:  # every rank must end with the same quantized model (all-reduced gradients)
        results["rank_state_sha256"] = dist.gather(state_sha256(qmodel))
        if len(set(results["rank_state_sha256"])) > 1:
            log.error("the ranks ended with different quantized models: %s", results["rank_state_sha256"])
    if dist.main:
        atomic_torch_save(qmodel.state_dict(), out_dir / "quantized_model.pt")
    if logger is not None:
        logger.log_metrics({"fp_top1": fp_top1, "quant_top1": quant_top1}, step=sum(u["iters"] for u in units))
    return results
