"""Speed benchmark: each method on a reference model, in its own process (so peak memory is its own).

    python benchmarks/methods.py --methods qdrop pdquant --model resnet20_fmnist --iters 200 --out bench.json

Records per method: wall time of the whole run, quantization time, time per unit (and its split into
caching (of which DC) / activation init / fitting), time per optimisation step, peak host memory (max RSS)
and peak CUDA memory, top-1; prints the ratios of each method's wall, quantization and fitting time to the
first method's (the PD-Quant/QDrop ratio: `--methods qdrop pdquant`). Not part of the test suite."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def one(args: argparse.Namespace) -> None:
    """Child process: run one method and print its measurements as JSON."""
    import torch
    from hydra import compose, initialize_config_dir

    from pdq.pipeline import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={args.workdir}", f"model={args.model}",
                                           f"method={args.one}", f"quant={args.quant}", f"seed={args.seed}",
                                           f"calib.size={args.calib_size}", "logger=none",
                                           *([f"method.iters={args.iters}"] if args.iters else []),
                                           *args.overrides])
    res = run(cfg)
    units = res["units"]
    steps = sum(u["iters"] for u in units)
    fit = sum(u.get("fit_s", 0.0) for u in units)
    print(json.dumps({
        "method": args.one, "model": args.model, "quant": args.quant, "iters": res["iters"],
        "quant_top1": res["quant_top1"], "wall_s": res["wall_s"], "quant_s": res["quant_s"],
        "cache_s": round(sum(u.get("cache_s", 0.0) for u in units), 2),
        "act_init_s": round(sum(u.get("act_init_s", 0.0) for u in units), 2), "fit_s": round(fit, 2),
        "dc_s": round(sum(u.get("dc_s", 0.0) for u in units), 2),
        "ms_per_step": round(1000 * fit / steps, 3) if steps else None,
        "units": [{k: u[k] for k in ("name", "seconds", "cache_s", "dc_s", "act_init_s", "fit_s") if k in u}
                  for u in units],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["qdrop", "pdquant"])
    ap.add_argument("--model", default="resnet20_fmnist")
    ap.add_argument("--quant", default="w4a4")
    ap.add_argument("--iters", type=int, default=200, help="steps per unit (0: the model's default)")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1005)
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks/methods.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer=gpu")
    args = ap.parse_args()
    if args.one:
        return one(args)
    from pdq.io import atomic_write_json

    rows = []
    for method in args.methods:
        workdir = args.out.parent / f"{args.out.stem}_{method}"
        cmd = [sys.executable, __file__, "--one", method, "--workdir", str(workdir), "--model", args.model,
               "--quant", args.quant, "--iters", str(args.iters), "--calib-size", str(args.calib_size),
               "--seed", str(args.seed), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method:10s} wall {rows[-1]['wall_s']:8.1f}s  quant {rows[-1]['quant_s']:8.1f}s  "
              f"fit {rows[-1]['fit_s']:8.1f}s  DC {rows[-1]['dc_s']:6.1f}s  "
              f"{rows[-1]['ms_per_step']} ms/step  peak RSS {rows[-1]['peak_rss_mib']} MiB  "
              f"top-1 {rows[-1]['quant_top1']:.2f}")
    first = rows[0]
    for r in rows:
        r["ratios_to_" + first["method"]] = {k: round(r[k] / first[k], 3) for k in ("wall_s", "quant_s", "fit_s")}
    atomic_write_json(args.out, {"model": args.model, "quant": args.quant, "iters": args.iters,
                                 "calib_size": args.calib_size, "runs": rows})
    for r in rows[1:]:
        ratios = r["ratios_to_" + first["method"]]
        print(f"{r['method']}/{first['method']}: wall {ratios['wall_s']:.2f}x, quantization {ratios['quant_s']:.2f}x, "
              f"fit {ratios['fit_s']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
