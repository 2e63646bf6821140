"""Speed benchmark: each method on a reference model, in its own process (so peak memory is its own).

    python benchmarks/methods.py --model resnet20_fmnist --iters 200 --out bench.json

By default it runs `qdrop`, `pdquant`, and `pdquant` again: the second PD-Quant run finds its Distribution
Correction in the DC cache that the first one filled (`<out>_cache/dc` is emptied at the start; the FP top-1
cache next to it is kept, so only the very first invocation evaluates the float model).

Records per run: wall time of the whole run, quantization time, time per unit (and its split into caching
(of which DC) / activation init / fitting), time per optimisation step, its floor and the ratio to it, peak
host memory (max RSS) and peak CUDA memory, top-1; prints the ratios of each run's wall, quantization and
fitting time to the first run's (the PD-Quant/QDrop ratio). The floor of a step is the same unit (and, for
PD-Quant, the FP rest of the network) forward and backward on a batch of the same size, with every
quantizer off, timed in the same process after the run. Not part of the test suite."""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def _floor_step(phase, seg, x, y, rest, rest_in, logits, weights) -> None:
    """One step's arithmetic as `pdq.recon.module.UnitReconstruction.losses` does it, quantizers off."""
    import torch

    from pdq.recon.losses import prediction_difference, reconstruction_loss

    if phase.uses_pd and phase.pd_branch_drop and phase.rec_weight > 0:
        out, out_q = seg(torch.cat([x, x])).split(len(x))
    else:
        out = out_q = seg(x)
    loss = reconstruction_loss(out, y, phase.rec_p)
    if rest is not None:
        loss = loss + prediction_difference(rest(out_q, *rest_in), logits, phase.temperature)
    loss.backward()
    for w in weights:
        w.grad = None


def floor_ms(cfg, qmodel, reps: int = 20) -> list[float]:
    """Per unit of the method's first phase: ms of one step's arithmetic without quantization (see above)."""
    import time

    import torch

    from pdq.errors import instantiate
    from pdq.quant.state import full_precision
    from pdq.recon.subgraph import prefix, segment, suffix
    from pdq.recon.units import enclosing

    phase = instantiate(cfg.method).phases[0]
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup()
    device = next(qmodel.parameters()).device
    fmt = torch.channels_last if cfg.calib.channels_last else torch.preserve_format
    images = data.calibration_set(cfg.calib.batch_size, cfg.seed).to(device, memory_format=fmt)
    qmodel.to(memory_format=fmt)
    times = []
    with full_precision(qmodel):
        logits = qmodel(images).detach()
        units = phase.units(qmodel)
        outers = enclosing(qmodel, units) if phase.uses_pd else [None] * len(units)
        for unit, outer in zip(units, outers):
            seg = segment(qmodel, unit)
            with torch.no_grad():
                x = prefix(qmodel, unit.input)(images)
                y = seg(x)
            rest = suffix(qmodel, unit.output, outer and outer.input) if phase.uses_pd else None
            rest_in = () if outer is None else (prefix(qmodel, outer.input)(images).detach(),)
            weights = [qmodel.get_submodule(n).weight for n in unit.layers(qmodel)]
            for w in weights:
                w.requires_grad_(True)

            step = functools.partial(_floor_step, phase, seg, x, y, rest, rest_in, logits, weights)
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t) / reps)
            for w in weights:
                w.requires_grad_(False)
    qmodel.to(memory_format=torch.contiguous_format)
    return times


def one(args: argparse.Namespace) -> None:
    """Child process: run one method and print its measurements as JSON."""
    import torch

    from pdq.config import compose
    from pdq.host_memory import keep_freed_memory
    from pdq.pipeline import execute

    cfg = compose([f"paths.output_dir={args.workdir}", f"model={args.model}", f"method={args.one}",
                   f"quant={args.quant}", f"seed={args.seed}", f"calib.size={args.calib_size}", "logger=none",
                   f"paths.cache_dir={args.cache_dir}", *([f"method.iters={args.iters}"] if args.iters else []),
                   *args.overrides])
    if cfg.keep_freed_memory:  # as `python run.py` does
        keep_freed_memory()
    res, qmodel = execute(cfg)
    units = res["units"]
    steps = sum(u["iters"] for u in units)
    fit = sum(u.get("fit_s", 0.0) for u in units)
    first = [u for u in units if u["iters"] and u["phase"] == 0]  # the floor is that of the first phase's steps
    floors = floor_ms(cfg, qmodel) if first else []
    floor_total = sum(u["iters"] * floors[u["index"]] / 1000 for u in first)
    first_steps, first_fit = sum(u["iters"] for u in first), sum(u["fit_s"] for u in first)
    print(json.dumps({
        "method": args.one, "model": args.model, "quant": args.quant, "iters": res["iters"],
        "quant_top1": res["quant_top1"], "wall_s": res["wall_s"], "quant_s": res["quant_s"],
        "cache_s": round(sum(u.get("cache_s", 0.0) for u in units), 2),
        "act_init_s": round(sum(u.get("act_init_s", 0.0) for u in units), 2), "fit_s": round(fit, 2),
        "dc_s": round(sum(u.get("dc_s", 0.0) for u in units), 2),
        "dc_cached_units": sum(bool(u.get("dc_cached")) for u in units),
        "ms_per_step": round(1000 * fit / steps, 3) if steps else None,
        "floor_ms_per_step": round(1000 * floor_total / first_steps, 3) if first_steps else None,
        "step_over_floor": round(first_fit / floor_total, 3) if floor_total else None,
        "units": [{k: u[k] for k in ("name", "seconds", "cache_s", "dc_s", "act_init_s", "fit_s") if k in u}
                  | ({"floor_ms": round(floors[u["index"]], 3)} if floors and u["phase"] == 0 else {})
                  for u in units],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["qdrop", "pdquant", "pdquant"],
                    help="a repeated method runs again on the DC cache the earlier run filled")
    ap.add_argument("--model", default="resnet20_fmnist")
    ap.add_argument("--quant", default="w4a4")
    ap.add_argument("--iters", type=int, default=200, help="steps per unit (0: the model's default)")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1005)
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks/methods.json"))
    ap.add_argument("--cache-dir", type=Path, help="paths.cache_dir (default: <out>_cache); its dc/ is emptied first")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer=gpu")
    args = ap.parse_args()
    if args.one:
        return one(args)
    import shutil

    from pdq.io import atomic_write_json

    cache_dir = args.cache_dir or args.out.parent / f"{args.out.stem}_cache"
    shutil.rmtree(cache_dir / "dc", ignore_errors=True)
    rows = []
    for k, method in enumerate(args.methods):
        workdir = args.out.parent / f"{args.out.stem}_{k}_{method}"
        cmd = [sys.executable, __file__, "--one", method, "--workdir", str(workdir), "--model", args.model,
               "--quant", args.quant, "--iters", str(args.iters), "--calib-size", str(args.calib_size),
               "--seed", str(args.seed), "--cache-dir", str(cache_dir), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        r["run"] = method + (" (DC cache)" if r["dc_cached_units"] else "")
        print(f"{r['run']:20s} wall {r['wall_s']:7.1f}s  quant {r['quant_s']:7.1f}s  cache {r['cache_s']:6.1f}s  "
              f"DC {r['dc_s']:6.1f}s  fit {r['fit_s']:6.1f}s  {r['ms_per_step']} ms/step (floor "
              f"{r['floor_ms_per_step']}, x{r['step_over_floor']})  peak RSS {r['peak_rss_mib']} MiB  "
              f"top-1 {r['quant_top1']}")
    first = rows[0]
    for r in rows:
        r["ratios_to_" + first["method"]] = {k: round(r[k] / first[k], 3) for k in ("wall_s", "quant_s", "fit_s")}
    atomic_write_json(args.out, {"model": args.model, "quant": args.quant, "iters": args.iters,
                                 "calib_size": args.calib_size, "runs": rows})
    for r in rows[1:]:
        ratios = r["ratios_to_" + first["method"]]
        print(f"{r['run']}/{first['method']}: wall {ratios['wall_s']:.2f}x, quantization {ratios['quant_s']:.2f}x, "
              f"fit {ratios['fit_s']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
