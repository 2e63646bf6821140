"""One pdq run, in order: check the config and every cheap input, build the model and its quantized graph,
load the data, decide the bit layout, evaluate FP, quantize, evaluate, write results.json and the model files,
export, then finish the logger.

Bad input ends in one `PdqError` before any heavy work: the config values (`pdq.validate`), the run dir
(writable), the logger (credentials, started), a resumed run's saved state, the checkpoint (loads, finite
weights), the model's input and the per-layer layout (resolved on the quantized graph) are all checked before
the data is loaded."""

from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

import pdq
from pdq.context import RunContext, resolve_device
from pdq.data import DataModule
from pdq.distributed import Dist, state_sha256
from pdq.errors import PdqError, instantiate
from pdq.evaluate import evaluate, fp_top1
from pdq.export.checkpoint import write_int_checkpoint
from pdq.io import atomic_torch_save, atomic_write_json, check_writable, write_errors_as_error, write_files
from pdq.launch import session
from pdq.loggers import check_logger, run_logger
from pdq.methods import Method
from pdq.mixed.sensitivity import model_cost
from pdq.models.registry import check_forward, check_input
from pdq.process import interrupts_as, run_scope, seed_and_switches
from pdq.quant import apply_layout, quantize_model
from pdq.quant.graph import integer_plan, log_integer_plan
from pdq.quant.layout import BitLayout
from pdq.recon.memory import check_fits, memory_plan
from pdq.recon.memory import describe as describe_plan
from pdq.recon.store import CacheStore
from pdq.recon.units import log_unit_table
from pdq.resume import (
    begin_part,
    fingerprint,
    finished_results,
    interrupted_message,
    load_resume_state,
    records_in,
    resume_dir,
)
from pdq.validate import validate

log = logging.getLogger("pdq")


@dataclass(frozen=True)
class Run:
    """What `execute` checked and built, passed whole to the work of every rank."""

    cfg: DictConfig
    layout: BitLayout              # as configured (quant=mixed: before its allocation)
    method: Method
    datamodule: DataModule
    out_dir: Path
    resume_state: dict | None      # the saved state of an interrupted run, continued from
    dist: Dist
    t0: float                      # when the run (this part of it) started
    model: torch.nn.Module | None  # given by `pdq.quantize`; None: built from cfg.model
    exporter: object | None        # `export=`: called with the run dir at the end


def run(cfg: DictConfig) -> dict:
    """One run from its config (the `pdq` command); returns results.json's content."""
    return execute(cfg)[0]


def execute(cfg: DictConfig, model: torch.nn.Module | None = None,
            datamodule=None) -> tuple[dict, torch.nn.Module | None]:
    """(results, quantized model) of one run; `model` and `datamodule`, when given (`pdq.quantize`), are used
    instead of building `cfg.model` and `cfg.data`. The model is None when a resumed run had finished. Ctrl-C
    ends it with `pdq.process.Interrupted`, whose message says what the run saved and how to resume it."""
    t0 = time.time()
    with run_scope(), interrupts_as(partial(interrupted_message, cfg)):
        layout = validate(cfg, check_model=model is None)
        layout.check_run()
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
        method = built(cfg.method, Method, "method")
        exporter = instantiate(cfg.export) if cfg.get("export") else None  # `export: null` leaves no key
        datamodule = datamodule if datamodule is not None else built(cfg.data, DataModule, "data")
        datamodule.prepare_data()  # cheap: the files exist, split sizes
        if cfg.calib.size > datamodule.train_size:
            raise PdqError(f"calib.size={cfg.calib.size} is larger than the training split "
                           f"({datamodule.train_size} images); accepted: 1..{datamodule.train_size}")
        with records_in(out_dir, job_dir), session(cfg.trainer, out_dir) as dist, write_errors_as_error(out_dir):
            if resume_state is not None:
                log.info("resuming %s after %d finished units", out_dir, len(resume_state["units"]))
            return run_ranks(Run(cfg, layout, method, datamodule, out_dir, resume_state, dist, t0, model, exporter))


def built(node: DictConfig, protocol: type, group: str):
    """`instantiate(node)`, which must be a `protocol` (a user's `_target_` may not be)."""
    obj = instantiate(node)
    if not isinstance(obj, protocol):
        raise PdqError(f"{group}._target_={node.get('_target_')!r} built a {type(obj).__name__}, which is not a "
                       f"{protocol.__module__}.{protocol.__name__}; accepted: a class with what that protocol lists")
    return obj


def run_ranks(run: Run) -> tuple[dict, torch.nn.Module]:
    """Everything after validation, on every rank of a DDP run (once without DDP). With `export=`, the model the
    run wrote is exported at its end (tried on the quantized graph first, before the heavy work)."""
    cfg, dist = run.cfg, run.dist
    seed_and_switches(cfg)
    device = resolve_device(cfg, dist)
    wall_before = begin_part(run.out_dir, run.resume_state is not None, run.t0) if dist.main else 0.0
    with run_logger(cfg, run.resume_state is not None, enabled=dist.main) as logger:  # rank 0 logs
        model = run.model if run.model is not None else instantiate(cfg.model)
        check_forward(model)
        model = model.eval().to(device)
        qmodel = quantize_model(model, backend=run.layout.backend).to(device)
        table = run.layout.resolve(qmodel)  # cheap: a bad per-layer name fails before the data
        apply_layout(qmodel, table)
        run.datamodule.setup()
        sample = run.datamodule.calibration_set(1, cfg.seed)
        check_input(model, sample[0].to(device), run.datamodule)
        if run.exporter is not None and dist.main:
            run.exporter.check(qmodel, list(sample.shape[1:]), table)
        calib = run.datamodule.calibration_set(cfg.calib.size, cfg.seed)
        ctx = RunContext(device=device, seed=cfg.seed, batch_size=cfg.calib.batch_size,
                         act_init_size=cfg.calib.act_init_size, cache_dtype=getattr(torch, cfg.calib.cache_dtype),
                         channels_last=cfg.calib.channels_last, trainer=instantiate(cfg.trainer), logger=logger,
                         out_dir=run.out_dir, resume_state=run.resume_state,
                         reconstruct_stem=run.layout.reconstruct_stem, fingerprint=fingerprint(cfg), fp_model=model,
                         dist=dist, cache_dir=cfg.paths.cache_dir,
                         store=CacheStore(cfg.calib.cache_device, device, cfg.calib.spill_dir))
        plan = memory_plan(qmodel, getattr(run.method, "phases", []), calib, ctx, cache_device=cfg.calib.cache_device,
                           limits=OmegaConf.to_container(cfg.memory_limit_mib))
        for line in describe_plan(plan):
            log.info(line)
        if dist.main:
            atomic_write_json(run.out_dir / "memory_plan.json", plan)
        if cfg.plan_only:
            log.info("plan_only=true: wrote %s; nothing else runs", run.out_dir / "memory_plan.json")
            return {"memory_plan": plan}, qmodel
        check_fits(plan, dist)
        layout, record = run.layout.prepare(qmodel, calib, ctx)  # quant=mixed: the allocation
        if layout is not run.layout:
            table = layout.resolve(qmodel)
            apply_layout(qmodel, table)
        if dist.main:
            write_files(run.out_dir, record["files"])
        results = {**quantize_and_evaluate(run, layout, table, model, qmodel, calib, ctx), **record["results"],
                   "memory_plan": plan}
        results["wall_s"] = round(wall_before + time.time() - run.t0, 2)
        if dist.main:  # before the logger is finished: a logger failure never loses the results
            atomic_write_json(run.out_dir / "results.json", results)
            log.info("wrote %s", run.out_dir / "results.json")
        if run.exporter is not None and dist.main:
            run.exporter(run.out_dir, model)
    return results, qmodel


def quantize_and_evaluate(run: Run, layout: BitLayout, table: dict, model: torch.nn.Module,
                          qmodel: torch.nn.Module, calib: torch.Tensor, ctx: RunContext) -> dict:
    """Quantize `qmodel` with the run's method on the calibration set, evaluate, and write the model files;
    returns results.json's content (without wall_s)."""
    cfg, dist, method, device = run.cfg, run.dist, run.method, ctx.device
    log.info("model=%s data=%s method=%s %s layout=%s seed=%d device=%s", cfg.model.name,
             run.datamodule.name, method.name, layout.label, layout.layout, cfg.seed, device)
    test_loader = run.datamodule.test_dataloader()
    if test_loader is None:
        log.info("data=%s has no evaluation set: top-1 is not measured", run.datamodule.name)
    fp = None if test_loader is None else fp_top1(
        model, test_loader, device, cache_dir=cfg.paths.cache_dir, model_name=cfg.model.name,
        data=OmegaConf.to_container(cfg.data, resolve=True), dist=dist)
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
        log.info("%s %s top-1: %.2f%% (FP %.2f%%)", method.name, layout.label, quant_top1, fp)

    results = {
        "model": cfg.model.name, "dataset": run.datamodule.name, "method": method.name,
        "w_bits": layout.w_bits, "a_bits": layout.a_bits, "seed": cfg.seed, "calib_size": cfg.calib.size,
        "iters": int(method.iters), "components": method.components,
        "fp_top1": _round(fp), "quant_top1": _round(quant_top1),
        "eval_images": len(test_loader.dataset) if test_loader is not None else 0,
        "quant_s": round(quant_seconds, 2), "versions": versions(),
        "unit_table": unit_table, "units": units, "layout": {"preset": layout.layout, **table},
        "backend": layout.backend, "integer_plan": plan,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "cost": model_cost(qmodel, calib[:1].to(device), table),  # weight bits, MiB and BOPs (the report)
        "world_size": dist.world_size,
        "peak_mib_per_rank": dist.gather(peak_memory_mib(device)),
    }
    if dist.enabled:  # every rank must end with the same quantized model (all-reduced gradients)
        results["rank_state_sha256"] = dist.gather(state_sha256(qmodel))
        if len(set(results["rank_state_sha256"])) > 1:
            log.error("the ranks ended with different quantized models: %s", results["rank_state_sha256"])
    if dist.main:
        atomic_torch_save(qmodel.state_dict(), run.out_dir / "quantized_model.pt")
        info = {key: results[key] for key in ("method", "w_bits", "a_bits", "seed", "quant_top1")}
        results["sizes"] = write_int_checkpoint(OmegaConf.to_container(cfg.model, resolve=True), model, qmodel,
                                                list(calib.shape[1:]), run.out_dir, info)
    if ctx.logger is not None and test_loader is not None:
        ctx.logger.log_metrics({"fp_top1": fp, "quant_top1": quant_top1}, step=sum(u["iters"] for u in units))
    return results


def versions() -> dict[str, str]:
    return {"pdq": pdq.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": version("lightning")}


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory (Linux reports KiB) and, on a GPU, peak allocated memory."""
    peak = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return peak


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
