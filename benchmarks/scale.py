"""Memory at the paper's scale: PD-Quant W4A4 at 224x224 on torchvision networks (random weights, synthetic
images), each cell in its own process (the peak is the process's), planned peak next to the measured one.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --out outputs/benchmarks/scale.json
    python benchmarks/scale.py --models resnet18 --images 1024 --dtypes float16 trainer=gpu

Each cell runs 2 steps and 2 DC steps per unit, and only the units up to the one where the memory plan puts
the peak (then it stops: the later units hold less). It records the measured peak host memory (max RSS) and,
on a GPU, the peak allocated memory, the plan's prediction of each, and the seconds per step of the units it
fitted. `calib.act_init_size` is 64 in every cell (`--act-init-size`), so that the cells differ only in the
calibration images.
Not part of the test suite."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


class _PeakPassed(BaseException):
    """Raised in a cell once the unit where the plan puts the peak is done."""


def cell(args: argparse.Namespace) -> None:
    """Child process: one cell; prints its measurements as JSON."""
    import torch

    from pdq.config import compose
    from pdq.host_memory import keep_freed_memory
    from pdq.pipeline import execute
    from pdq.recon.engine import ReconstructionEngine

    workdir = Path(args.workdir)
    cfg = compose([f"paths.output_dir={workdir}", f"model={args.cell}", f"model.checkpoint={args.checkpoint}",
                   "data=synthetic", "data.image_size=224", f"data.size={args.n}", f"calib.size={args.n}",
                   f"calib.act_init_size={min(args.act_init_size, args.n)}", f"calib.cache_dtype={args.dtype}",
                   "method=pdquant", "quant=w4a4", "method.iters=2", "method.dc.steps=2", "logger=none",
                   "paths.cache_dir=null", *args.overrides])
    if cfg.keep_freed_memory:  # as the pdq command does
        keep_freed_memory()
    seen = {}
    save = ReconstructionEngine.save

    def save_then_stop(engine, p, i):
        save(engine, p, i)
        plan = json.loads((workdir / "memory_plan.json").read_text())
        peaks = {(s["phase"], s["unit"]) for s in plan["stages"] for k in plan["peak_mib"]
                 if s[f"{k}_mib"] == plan["peak_mib"][k]}
        seen["units"], seen["plan"] = engine.summaries, plan
        done = {(u["phase"], u["name"]) for u in engine.summaries}
        if peaks <= done:
            raise _PeakPassed

    ReconstructionEngine.save = save_then_stop
    t0 = time.time()
    try:
        execute(cfg)
    except _PeakPassed:
        pass
    units, plan = seen["units"], seen["plan"]
    steps = sum(u["iters"] for u in units)
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    print(json.dumps({
        "model": args.cell, "images": args.n, "cache_dtype": args.dtype, "act_init_size": cfg.calib.act_init_size,
        "units_run": len(units),
        "planned_host_mib": plan["peak_mib"]["host"], "planned_at": plan["peak_at"],
        "measured_host_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "planned_device_mib": plan["peak_mib"].get("device"),
        "measured_device_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None,
        "s_per_step": round(sum(u["fit_s"] for u in units) / steps, 3) if steps else None,
        "wall_s": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}",
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "resnet50"])
    ap.add_argument("--images", nargs="+", type=int, default=[64, 256, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], help="calib.cache_dtype values")
    ap.add_argument("--act-init-size", type=int, default=64, help="calib.act_init_size (at most the images)")
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks/scale.json"))
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer=gpu")
    args = ap.parse_args()
    if args.cell:
        return cell(args)
    import torch
    import torchvision

    from pdq.io import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print("network | images | cache dtype | planned peak MiB | measured peak MiB | planned/measured | s/step | "
          "units run | planned at")
    for model in args.models:
        checkpoint = args.out.parent / f"{model}_random.pt"
        if not checkpoint.exists():
            torch.manual_seed(0)
            torch.save(getattr(torchvision.models, model)().state_dict(), checkpoint)
        for dtype in args.dtypes:
            for n in args.images:
                workdir = args.out.parent / f"scale_{model}_{n}_{dtype}"
                cmd = [sys.executable, __file__, "--cell", model, "--n", str(n), "--dtype", dtype,
                       "--act-init-size", str(args.act_init_size),
                       "--checkpoint", str(checkpoint), "--workdir", str(workdir), *args.overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"{model} {n} {dtype} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                where = "device" if r["measured_device_mib"] is not None else "host"
                planned, measured = r[f"planned_{where}_mib"], r[f"measured_{where}_mib"]
                print(f"{model} | {n} | {dtype} | {planned:,.0f} | {measured:,.0f} | {planned / measured:.2f} | "
                      f"{r['s_per_step']} | {r['units_run']} | {r['planned_at'][where]}", flush=True)
                atomic_write_json(args.out, {"rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
