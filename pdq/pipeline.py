"""One pdq run: validate the config, load model and data, evaluate FP, quantize, evaluate, write results."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from importlib.metadata import version
from pathlib import Path

import lightning as L
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

import pdq
from pdq.context import RunContext
from pdq.distributed import SINGLE, Dist, session, state_sha256, world_size_of
from pdq.errors import PdqError, instantiate
from pdq.evaluate import evaluate
from pdq.io import atomic_torch_save, atomic_write_json
from pdq.models import check_model_name
from pdq.quant import apply_layout, quantize_model
from pdq.quant.layout import BitLayout
from pdq.recon.engine import STATE_FILE

log = logging.getLogger("pdq")
for noisy in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def validate(cfg: DictConfig) -> BitLayout:
    """Cheap checks of every user value, before anything heavy is loaded."""
    check_model_name(cfg.model.name)
    if cfg.model.get("checkpoint") and not Path(cfg.model.checkpoint).expanduser().is_file():
        raise PdqError(f"model.checkpoint={cfg.model.checkpoint!r} does not exist "
                       f"(accepted: a readable checkpoint file)")
    if cfg.calib.get("cache_dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise PdqError(f"calib.cache_dtype={cfg.calib.cache_dtype!r} is not accepted; accepted: float32, float16, "
                       f"bfloat16")
    for key in ("size", "batch_size", "act_init_size"):
        value = cfg.calib[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PdqError(f"calib.{key}={value!r} is not accepted; accepted: a positive integer")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise PdqError(f"seed={cfg.seed!r} is not accepted; accepted: an integer")
    if cfg.get("resume") not in (None, "auto") and not (Path(cfg.resume).expanduser() / STATE_FILE).is_file():
        raise PdqError(f"resume={cfg.resume!r} holds no {STATE_FILE}; accepted: the run dir of an interrupted "
                       f"reconstruction run, or auto")
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
    """The settings a resumed run must share with the interrupted one."""
    keep = ("model", "data", "method", "quant", "calib", "seed")
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(keep)), resolve=True)


def settings_diff(saved: dict | None, cfg: DictConfig) -> list[str]:
    """The fingerprint keys (model, data, ...) in which `saved` differs from this run's config."""
    now = fingerprint(cfg)
    return sorted(k for k in now if (saved or {}).get(k) != now[k])


def finished_results(cfg: DictConfig) -> dict | None:
    """With `resume=auto`: the `results.json` already in this run's own dir, when the same settings made it."""
    path = Path(cfg.paths.output_dir) / "results.json"
    if cfg.get("resume") != "auto" or not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PdqError(f"resume=auto: {path} is not valid JSON ({e}); remove it to run this job again") from None
    diff = settings_diff(results.get("config"), cfg)
    if diff:
        raise PdqError(f"resume=auto: {path} holds the results of other settings ({', '.join(diff)} differ); "
                       f"give this run another dir (hydra.run.dir / hydra.sweep.dir) or remove that one")
    return results


def load_resume_state(cfg: DictConfig) -> tuple[Path, dict | None]:
    """(output dir, saved state or None). A resumed run writes into the interrupted run's dir; `resume=auto`
    resumes from this run's own dir when it holds a saved state, and starts afresh otherwise."""
    if not cfg.get("resume"):
        return Path(cfg.paths.output_dir), None
    run_dir = Path(cfg.paths.output_dir if cfg.resume == "auto" else cfg.resume).expanduser()
    if cfg.resume == "auto" and not (run_dir / STATE_FILE).is_file():
        return run_dir, None
    state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=False)
    diff = settings_diff(state.get("fingerprint"), cfg)
    if diff:
        raise PdqError(f"resume={cfg.resume!r}: the interrupted run in {run_dir} was made with other settings "
                       f"({', '.join(diff)} differ); resume with the interrupted run's overrides")
    log.info("resuming %s after %d finished units", run_dir, len(state["units"]))
    return run_dir, state


def run(cfg: DictConfig) -> dict:
    t0 = time.time()
    layout = validate(cfg)
    done = finished_results(cfg)
    if done is not None:
        log.info("resume=auto: %s already holds this run's results.json (top-1 %.2f%%); nothing to do",
                 cfg.paths.output_dir, done["quant_top1"])
        return done
    out_dir, resume_state = load_resume_state(cfg)
    with session(cfg.trainer, out_dir) as dist:
        results = run_ranks(cfg, layout, out_dir, resume_state, dist)
        results["wall_s"] = round(time.time() - t0, 2)
        if dist.main:
            atomic_write_json(out_dir / "results.json", results)
            log.info("wrote %s", out_dir / "results.json")
    return results


def run_ranks(cfg: DictConfig, layout: BitLayout, out_dir: Path, resume_state: dict | None, dist: Dist) -> dict:
    """Everything after validation, on every rank of a DDP run (once without DDP)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic", True)), warn_only=True)
    device = resolve_device(cfg, dist)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    if cfg.calib.size > datamodule.train_size:
        raise PdqError(f"calib.size={cfg.calib.size} is larger than the training split "
                       f"({datamodule.train_size} images); accepted: 1..{datamodule.train_size}")
    model = instantiate(cfg.model).to(device)
    method = instantiate(cfg.method)
    logger = instantiate(cfg.logger) if cfg.get("logger") and dist.main else None  # rank 0 logs
    try:
        results = quantize_and_evaluate(cfg, layout, datamodule, model, method, logger, device, out_dir,
                                        resume_state, dist)
    except BaseException:
        close_logger(logger, ok=False)
        raise
    close_logger(logger, ok=True)
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


def quantize_and_evaluate(cfg, layout, datamodule, model, method, logger, device, out_dir, resume_state,
                          dist: Dist = SINGLE) -> dict:
    log.info("model=%s data=%s method=%s W%dA%d layout=%s seed=%d device=%s", cfg.model.name,
             datamodule.name, method.name, layout.w_bits, layout.a_bits, layout.layout, cfg.seed, device)
    test_loader = datamodule.test_dataloader()
    fp_top1 = fp_accuracy(cfg, model, test_loader, device, dist)

    calib = datamodule.calibration_set(cfg.calib.size, cfg.seed)
    qmodel = quantize_model(model).to(device)
    table = layout.resolve(qmodel)
    apply_layout(qmodel, table)
    ctx = RunContext(device=device, seed=cfg.seed, batch_size=cfg.calib.batch_size,
                     act_init_size=cfg.calib.act_init_size, trainer=instantiate(cfg.trainer), logger=logger,
                     out_dir=out_dir, resume_state=resume_state, reconstruct_stem=layout.reconstruct_stem,
                     fingerprint=fingerprint(cfg), fp_model=model,
                     cache_dtype=getattr(torch, cfg.calib.get("cache_dtype", "float32")), dist=dist)
    t_q = time.time()
    units = method.quantize(qmodel, calib, ctx)
    quant_seconds = time.time() - t_q
    quant_top1 = evaluate(qmodel, test_loader, device, desc="quant eval", dist=dist)
    log.info("%s W%dA%d top-1: %.2f%% (FP %.2f%%)", method.name, layout.w_bits, layout.a_bits, quant_top1, fp_top1)

    results = {
        "model": cfg.model.name, "dataset": datamodule.name, "method": method.name,
        "w_bits": layout.w_bits, "a_bits": layout.a_bits, "seed": cfg.seed, "calib_size": cfg.calib.size,
        "iters": int(getattr(method, "iters", 0)), "fp_top1": round(fp_top1, 4), "quant_top1": round(quant_top1, 4),
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
