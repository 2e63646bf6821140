"""DDP scaling benchmark: the same run with 1, 2, ... processes at the same global batch.

    python benchmarks/ddp_scaling.py --procs 1 2 --threads 2 --method pdquant --iters 100 --calib-size 256
    python benchmarks/ddp_scaling.py --trainer ddp --procs 1 2 4 8 --threads 0 model=resnet18_brecq ...

Each run is `python run.py trainer=<trainer> trainer.devices=N` (N=1: `trainer=cpu` / `trainer=gpu`) in
its own run dir. `--threads T` is the
CPU thread budget of the whole run: each of the N processes gets T/N threads (OMP_NUM_THREADS), so 1 and 2
processes use the same cores (0: leave threads alone, e.g. on GPUs). Records per run: wall, quantization
and fitting time, time per optimisation step (fit time / steps), peak memory of every rank, top-1 and
whether the ranks ended identical; prints the per-step speed-up over the first entry. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`
SINGLE = {"ddp_cpu": "cpu", "ddp": "gpu"}  # one process: the plain trainer, no DDP wrapper


def measure(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    units = res["units"]
    steps = sum(u["iters"] for u in units)
    fit = sum(u.get("fit_s", 0.0) for u in units)
    sha = res.get("rank_state_sha256")
    return {"procs": res["world_size"], "quant_top1": res["quant_top1"], "wall_s": res["wall_s"],
            "quant_s": res["quant_s"], "fit_s": round(fit, 2), "dc_s": round(sum(u.get("dc_s", 0.0) for u in units), 2),
            "cache_s": round(sum(u.get("cache_s", 0.0) for u in units), 2),
            "ms_per_step": round(1000 * fit / steps, 2) if steps else None,
            "peak_mib_per_rank": res["peak_mib_per_rank"],
            "ranks_identical": None if sha is None else len(set(sha)) == 1,
            "run_dir": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--trainer", default="ddp_cpu", help="ddp_cpu (gloo) or ddp (GPUs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for the whole run (0: unset)")
    ap.add_argument("--model", default="resnet20_fmnist")
    ap.add_argument("--method", default="pdquant")
    ap.add_argument("--quant", default="w4a4")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks/ddp_scaling.json"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    from pdq.io import atomic_write_json

    rows = []
    for n in args.procs:
        run_dir = args.out.parent / f"{args.out.stem}_{n}proc"
        env = dict(os.environ, WANDB_MODE="offline")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(max(1, args.threads // n))
        trainer = [f"trainer={args.trainer}", f"trainer.devices={n}"] if n > 1 else [f"trainer={SINGLE[args.trainer]}"]
        cmd = [sys.executable, str(ROOT / "run.py"), *trainer,
               f"model={args.model}", f"method={args.method}", f"quant={args.quant}", f"seed={args.seed}",
               f"calib.size={args.calib_size}", f"model.ptq.iters={args.iters}", "logger=none",
               f"hydra.run.dir={run_dir}", *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            sys.exit(f"{n} processes failed:\n{proc.stderr[-3000:]}")
        rows.append({**measure(run_dir), "threads_per_proc": env.get("OMP_NUM_THREADS")})
        print(json.dumps(rows[-1]))
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["step_speedup"] = round(base / r["ms_per_step"], 2) if base and r["ms_per_step"] else None
        print(f"{r['procs']} proc: {r['ms_per_step']} ms/step ({r['step_speedup']}x), wall {r['wall_s']} s, "
              f"peak MiB per rank {[m['host'] for m in r['peak_mib_per_rank']]}, top-1 {r['quant_top1']}")
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "runs": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
