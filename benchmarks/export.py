"""Export benchmark: onnxruntime parity of pdq's ONNX QDQ export, file sizes, and W8A8 CPU latency.

    python benchmarks/export.py --out outputs/benchmarks/export.json      # both tables (writes .json and .md)
    python benchmarks/export.py --parts latency                            # the latency table only

Parity: for each model x bits x method family (round to nearest: rtn_mse; AdaRound/BRECQ/QDrop: qdrop; PD-Quant:
pdquant), one short run (calibration `--calib` images, `--iters` steps per unit; these are export checks, not
the paper's settings), into `<out dir>/runs/<model>_<method>_<bits>` (a finished run is reused). Then
`pdq export` at the default opset, and on the whole evaluation split: pdq's top-1 (results.json), the top-1 of
`pdq.load`'s model, onnxruntime's top-1 with its QDQ transformers off (pdq's arithmetic) and, at W8A8, with its
defaults (integer kernels), the largest logit difference (also in head steps: s_in * max_j sum_i |W_ji| of the
classifier), the export time and the sizes of the float state dict, the integer checkpoint and the ONNX file.

`--runs DIR ...`: the parity rows of finished run dirs instead (e.g. a sweep's jobs, any backend), each exported
again.

Latency: each model's FP32 ONNX (torch.onnx.export of the float model) against the W8A8 QDQ export, on
onnxruntime's CPU provider with `--threads` threads, batch 1 and 64: median ms over `--reps` runs after warm-up.
Not part of the test suite."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist")
BITS = ("w8a8", "w4a4", "w3a3", "w2a4", "w4a2", "w2a2")
METHODS = ("rtn_mse", "qdrop", "pdquant")


def quantized_run(run_dir: Path, model: str, method: str, bits: str, args) -> dict:
    """results.json of the run (run now unless it finished before)."""
    from hydra import compose, initialize_config_dir

    from pdq.pipeline import run

    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    overrides = [f"model={model}", f"method={method}", f"quant={bits}", "logger=none", f"calib.size={args.calib}",
                 f"calib.act_init_size={min(256, args.calib)}", f"seed={args.seed}", f"paths.output_dir={run_dir}",
                 f"paths.cache_dir={args.out.parent / 'cache'}"]
    if method != "rtn_mse":
        overrides.append(f"method.iters={args.iters}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run(cfg)


def parity_row(run_dir: Path, results: dict, x, y) -> dict:
    import torch

    import pdq
    from pdq.export.onnx import export_onnx
    from pdq.export.parity import head_step, onnx_logits
    from pdq.export.runtime import session

    t0 = time.time()
    path = export_onnx(run_dir)
    export_s = time.time() - t0
    model = pdq.load(run_dir)
    with torch.no_grad():
        ours = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    theirs = onnx_logits(session(path), x)
    diff = (ours - theirs).abs().max().item()
    row = {"model": results["model"], "method": results["method"], "bits": f"W{results['w_bits']}A{results['a_bits']}",
           "backend": results.get("backend", "academic"), "seed": results["seed"], "run_dir": str(run_dir),
           "pdq_top1": results["quant_top1"], "load_top1": round(100 * (ours.argmax(1) == y).float().mean().item(), 2),
           "ort_top1": round(100 * (theirs.argmax(1) == y).float().mean().item(), 2),
           "pred_mismatch": int((ours.argmax(1) != theirs.argmax(1)).sum()), "max_logit_diff": round(diff, 6),
           "max_diff_head_steps": round(diff / head_step(model), 4), "export_s": round(export_s, 2),
           "fp32_bytes": results["sizes"]["fp32_state_bytes"], "int_bytes": results["sizes"]["int_file_bytes"],
           "onnx_bytes": path.stat().st_size}
    if min(results["w_bits"], results["a_bits"]) == 8:
        fused = onnx_logits(session(path, fuse=True), x)
        row["ort_fused_top1"] = round(100 * (fused.argmax(1) == y).float().mean().item(), 2)
        row["fused_max_logit_diff"] = round((ours - fused).abs().max().item(), 6)
    return row


def latency_ms(sess, batch, reps: int) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: batch})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {name: batch})
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def latency_rows(args) -> list[dict]:
    import onnx
    import torch

    from pdq.export.onnx import torch_export
    from pdq.export.runtime import session
    from pdq.models import build_model

    rows = []
    for model in args.models:
        run_dir = args.out.parent / "runs" / f"{model}_rtn_mse_w8a8"
        fp32 = run_dir / "fp32.onnx"
        onnx.save(torch_export(build_model(model), [1, 28, 28], 18), fp32)
        sessions = {"fp32": session(fp32, args.threads, fuse=True),
                    "w8a8_int": session(run_dir / "quantized_model.onnx", args.threads, fuse=True),
                    "w8a8_qdq_float": session(run_dir / "quantized_model.onnx", args.threads)}
        for batch in (1, 64):
            x = torch.randn(batch, 1, 28, 28).numpy()
            ms = {key: round(latency_ms(s, x, args.reps if batch == 1 else max(20, args.reps // 10)), 3)
                  for key, s in sessions.items()}
            rows.append({"model": model, "batch": batch, **{f"{k}_ms": v for k, v in ms.items()},
                         "speedup_int": round(ms["fp32"] / ms["w8a8_int"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(parity: list[dict], latency: list[dict]) -> str:
    lines = []
    if parity:
        lines += ["| model | bits | method | backend | pdq top-1 | ORT top-1 | differing predictions | max abs logit "
                  "diff (head steps) | FP32 state | int checkpoint | ONNX | export s |", "|" + " --- |" * 12]
        for r in parity:
            fused = f" (int kernels: {r['ort_fused_top1']:.2f})" if "ort_fused_top1" in r else ""
            lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r.get('backend', 'academic')} "
                         f"| {r['pdq_top1']:.2f} | {r['ort_top1']:.2f}"
                         f"{fused} | {r['pred_mismatch']} | {r['max_logit_diff']:.2g} ({r['max_diff_head_steps']:.2g}) "
                         f"| {r['fp32_bytes'] / 1024:.0f} KiB | {r['int_bytes'] / 1024:.0f} KiB | "
                         f"{r['onnx_bytes'] / 1024:.0f} KiB | {r['export_s']:.1f} |")
    if latency:
        lines += ["", "| model | batch | FP32 ms | W8A8 ms (integer kernels) | W8A8 ms (QDQ in float) | FP32 / W8A8 |",
                  "|" + " --- |" * 6]
        for r in latency:
            lines.append(f"| {r['model']} | {r['batch']} | {r['fp32_ms']} | {r['w8a8_int_ms']} | "
                         f"{r['w8a8_qdq_float_ms']} | {r['speedup_int']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "export.json")
    ap.add_argument("--parts", nargs="+", choices=["parity", "latency"], default=["parity", "latency"])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--bits", nargs="+", default=list(BITS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=Path, nargs="+", help="parity of these finished run dirs (instead of new runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    import torch

    from pdq.io import atomic_write, atomic_write_json

    torch.set_num_threads(args.threads)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "parity" in args.parts:
        from pdq.data.fashion_mnist import FashionMNISTDataModule

        dm = FashionMNISTDataModule()
        dm.prepare_data()
        dm.setup()
        x, y = map(torch.cat, zip(*dm.test_dataloader()))
        out["parity"] = []
        jobs = [(run_dir, json.loads((run_dir / "results.json").read_text())) for run_dir in args.runs or []]
        if not args.runs:
            jobs = ((args.out.parent / "runs" / f"{model}_{method}_{bits}", model, method, bits)
                    for model in args.models for bits in args.bits for method in args.methods)
            jobs = ((run_dir, quantized_run(run_dir, model, method, bits, args))
                    for run_dir, model, method, bits in jobs)
        for run_dir, results in jobs:
            out["parity"].append(parity_row(run_dir, results, x, y))
            print(json.dumps(out["parity"][-1]), flush=True)
            atomic_write_json(args.out, out)
    if "latency" in args.parts:
        out["latency"] = latency_rows(args)
    out["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out, out)
    atomic_write(args.out.with_suffix(".md"), markdown(out.get("parity", []), out.get("latency", [])))
    print(markdown(out.get("parity", []), out.get("latency", [])))


if __name__ == "__main__":
    main()
