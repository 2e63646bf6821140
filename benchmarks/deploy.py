"""Deployment benchmark: onnxruntime CPU latency of one network as FP32, as pdq's W8A8 and as onnxruntime's own
`quantize_static` W8A8, with the operators onnxruntime's optimizer leaves in each graph.

    python benchmarks/deploy.py --out outputs/benchmarks/deploy.json                  # writes .json and .md
    python benchmarks/deploy.py --variants fp32 ort_static --models resnet20_fmnist --threads 2 --accuracy

Networks: pdq's `resnet20_fmnist` and `mobilenetv2_fmnist` (bundled trained weights, 1x28x28, calibrated on
`--calib-images` Fashion-MNIST training images drawn and normalised as pdq's data module does), torchvision's
`resnet18` and `mobilenet_v2` (3x224x224, random weights; every BatchNorm's statistics and affine terms are drawn
from a fixed seed, since with the default init all folded biases are equal and the exporter shares them through
Identity nodes, which stops onnxruntime's QDQ fusion; calibrated on seeded Gaussian images).

Variants, each an ONNX file of the same network:
  fp32        torch.onnx.export (dynamo, opset 18, dynamic batch) of the float model;
  pdq         pdq.quantize(..., bits="w8a8", backend="onnxruntime") (`--method`, default rtn_mse) and its
              `pdq.export.onnx.export_onnx` (a finished run dir is reused);
  ort_static  onnxruntime.quantization.quantize_static of the fp32 file (after `quant_pre_process` when that
              works): QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax calibration on the same
              calibration images in batches of 32;
  pdq_academic  the same pdq run under the academic backend (the papers' placement and grids), for contrast.

Latency: one onnxruntime CPU session per variant and thread count (ORT_ENABLE_ALL, intra-op `--threads`, inter-op
1, sequential), batch 1 and 64 (28x28) or 1 and 16 (224x224); 5 warm-up runs, then `--reps` timed `sess.run`
calls (fewer where a cell would take longer than `--cell-seconds`) in `--rounds` turns per variant, each turn
after `--settle-seconds` of untimed calls of that variant (the previous session's threads stop spinning), so
that drift of the machine affects the variants alike; the median ms of each. Op counts: the optimized graph
(`SessionOptions.optimized_model_filepath`), or `pdq.export.audit` where it exists. `--accuracy`: top-1 of every
variant on the 10,000 Fashion-MNIST test images through onnxruntime (the fmnist networks).
Not part of the test suite."""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "resnet18", "mobilenet_v2")
FMNIST = ("resnet20_fmnist", "mobilenetv2_fmnist")
VARIANTS = ("fp32", "pdq", "ort_static", "pdq_academic")
#: columns of the op-count table: label -> the op types of the optimized graph counted together
COUNTED = {"QLinearConv": ("QLinearConv",), "QLinearAdd": ("QLinearAdd",), "QGemm": ("QGemm",),
           "float Conv": ("Conv", "FusedConv", "NhwcFusedConv"), "float Add": ("Add", "Sum"),
           "float Gemm": ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")}
FLOAT_OPS = {t for types in COUNTED.values() for t in types if not t.startswith("Q")}


def input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name in FMNIST else (3, 224, 224)


def batches(name: str) -> tuple[int, int]:
    return (1, 64) if name in FMNIST else (1, 16)


def build(name: str, seed: int):
    """The float network in eval mode: pdq's bundled fmnist models, or a torchvision model with random weights
    whose BatchNorms are randomised from `seed`."""
    import torch
    import torchvision
    from torch import nn

    from pdq.models import build_model

    if name in FMNIST:
        return build_model(name)  # loads the bundled trained checkpoint (pretrained=True)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def calibration_images(name: str, n: int, seed: int):
    """`n` calibration images: Fashion-MNIST training images (pdq's draw and normalisation), else seeded randn."""
    import torch

    if name in FMNIST:
        from pdq.data.fashion_mnist import FashionMNISTDataModule

        return FashionMNISTDataModule().calibration_set(n, seed)
    return torch.randn(n, *input_shape(name), generator=torch.Generator().manual_seed(seed))


def export_fp32(model, shape, path: Path) -> Path:
    import torch

    x = torch.zeros(2, *shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False)  # one self-contained file (quantize_static reads it alone)
    return path


def pdq_w8a8(model, images, run_dir: Path, method: str, backend: str = "onnxruntime") -> Path:
    """pdq's W8A8 ONNX model of `model` under `backend` (a finished run, or its file, is reused)."""
    path = run_dir / "quantized_model.onnx"
    if path.is_file():
        return path
    import pdq
    from pdq.export.onnx import export_onnx

    if not (run_dir / "results.json").is_file():  # else a finished run that was not exported yet
        pdq.quantize(copy.deepcopy(model), images, method=method, bits="w8a8", backend=backend,
                     out_dir=run_dir, seed=1, logger="none")  # calib.size: every given image
    return Path(export_onnx(run_dir, model=model))


def ort_static(fp32: Path, images, out: Path, batch_size: int = 32) -> tuple[Path, str]:
    """onnxruntime's quantize_static of `fp32` (QDQ, per-channel symmetric int8 weights, uint8 activations,
    MinMax), and whether quant_pre_process ran ("ok", or why it was skipped)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    source, pre = fp32, out.with_name(out.stem + "_pre.onnx")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(pre))
        source, prep = pre, "ok"
    except Exception as e:  # any failure: quantize the exporter's file as it is
        prep = f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # WeightSymmetric=True is onnxruntime's default for int8 weights; given explicitly
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True})
    return out, prep


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # not the warning that NCHWc layouts are specific to this CPU
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def count_ops(path: Path, optimized: Path) -> dict:
    """The op types of onnxruntime's optimized graph of `path` (one thread), in the layout of `audit`'s keys."""
    import onnx

    session(path, 1, optimized)
    graph = onnx.load(str(optimized)).graph
    inits = {t.name for t in graph.initializer}
    weight_dq = [n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    float_ops = [{"op": n.op_type, "name": n.name} for n in graph.node if n.op_type in FLOAT_OPS]
    counts = collections.Counter(n.op_type for n in graph.node)
    return {"op_counts": dict(counts.most_common()), "float_ops": float_ops, "weight_dequantize": weight_dq,
            "summary": {"float": len(float_ops), "weight_dequantize": len(weight_dq),
                        "transposes": counts["Transpose"]}}


def op_report(path: Path, optimized: Path) -> dict:
    """`pdq.export.audit`'s report of `path` where that module exists, else `count_ops`; with `counts`, the
    columns of the op-count table."""
    try:
        from pdq.export.audit import audit
    except ImportError:
        report = {"counted_by": "benchmarks/deploy.py", **count_ops(path, optimized)}
    else:
        report = {"counted_by": "pdq.export.audit", **audit(path, threads=1)}
    ops = report.get("op_counts", {})
    counts = {label: sum(ops.get(t, 0) for t in types) for label, types in COUNTED.items()}
    counts["DequantizeLinear of initializer"] = report.get("summary", {}).get("weight_dequantize")
    counts["Transpose"] = ops.get("Transpose", 0)
    return {"counts": counts, **report}


def timed_ms(sess, feed) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return 1000 * (time.perf_counter() - t0)


def measure(sessions: dict, x, args) -> tuple[dict, int]:
    """Median ms per variant and the number of timed calls per variant. The variants take turns in `--rounds`
    rounds (the first of each round rotating), so that a slow spell of the machine falls on all of them alike.
    Each turn first runs the variant untimed for `--settle-seconds`, then times a block of calls: the worker
    threads of a session that has just run keep spinning for tens of milliseconds, and on two cores they take
    the next session's core (timed call by call, FP32 at two threads measured twice its own time)."""
    feed = {"input": x}
    est = {}
    for key, sess in sessions.items():
        for _ in range(5):
            est[key] = timed_ms(sess, feed)
    per_round_s = sum(est.values()) / 1000
    reps = max(args.min_reps, min(args.reps, int(args.cell_seconds / max(per_round_s, 1e-9))))
    block = max(1, -(-reps // args.rounds))
    times = {key: [] for key in sessions}
    keys = list(sessions)
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            settled = time.perf_counter() + args.settle_seconds
            while time.perf_counter() < settled:
                sessions[key].run(None, feed)
            times[key] += [timed_ms(sessions[key], feed) for _ in range(block)]
    return {key: statistics.median(t) for key, t in times.items()}, block * args.rounds


def top1(path: Path, x, y, threads: int) -> float:
    import numpy as np

    sess = session(path, threads)
    pred = np.concatenate([sess.run(None, {"input": x[i:i + 500].numpy()})[0].argmax(1)
                           for i in range(0, len(x), 500)])
    return round(100 * float((pred == y.numpy()).mean()), 2)


def bench_model(name: str, args, out: dict) -> None:
    import numpy as np
    import torch

    work = args.out.parent / "deploy" / name
    work.mkdir(parents=True, exist_ok=True)
    model = build(name, args.seed)
    images = calibration_images(name, args.calib_images, args.seed)
    paths, info = {}, {"model": name, "input_shape": list(input_shape(name)), "calib_images": len(images)}
    t0 = time.time()
    paths["fp32"] = export_fp32(model, input_shape(name), work / "fp32.onnx")
    info["fp32_export_s"] = round(time.time() - t0, 2)
    if "pdq" in args.variants:
        t0, info["pdq_reused"] = time.time(), (work / f"pdq_{args.method}_w8a8" / "results.json").is_file()
        paths["pdq"] = pdq_w8a8(model, images, work / f"pdq_{args.method}_w8a8", args.method)
        info["pdq_s"] = round(time.time() - t0, 2)
    if "pdq_academic" in args.variants:
        paths["pdq_academic"] = pdq_w8a8(model, images, work / f"pdq_{args.method}_w8a8_academic", args.method,
                                         "academic")
    if "ort_static" in args.variants:
        t0 = time.time()
        paths["ort_static"], info["quant_pre_process"] = ort_static(paths["fp32"], images, work / "ort_static.onnx")
        info["ort_static_s"] = round(time.time() - t0, 2)
    paths = {k: paths[k] for k in VARIANTS if k in args.variants}
    out["builds"].append(info)
    print(json.dumps(info), flush=True)
    for key, path in paths.items():
        ops = op_report(path, work / f"{key}.optimized.onnx")
        ops["onnx"], ops["optimized_onnx"] = ops.pop("model", str(path)), ops.pop("optimized_model", None)
        out["ops"].append({"model": name, "variant": key, "file_bytes": path.stat().st_size, **ops})
        print(json.dumps({"model": name, "variant": key, **ops["counts"], "summary": ops.get("summary")}),
              flush=True)
    if args.accuracy and name in FMNIST:
        from pdq.data.fashion_mnist import FashionMNISTDataModule

        x, y = map(torch.cat, zip(*FashionMNISTDataModule().test_dataloader()))
        acc = {"model": name, "images": len(y), **{f"{k}_top1": top1(p, x, y, max(args.threads))
                                                   for k, p in paths.items()}}
        out["accuracy"].append(acc)
        print(json.dumps(acc), flush=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    for threads in args.threads:
        sessions = {key: session(path, threads) for key, path in paths.items()}
        for batch in batches(name):
            x = torch.randn(batch, *input_shape(name), generator=g).numpy().astype(np.float32)
            ms, reps = measure(sessions, x, args)
            for key in paths:
                row = {"model": name, "variant": key, "threads": threads, "batch": batch, "ms": round(ms[key], 4),
                       "speedup_vs_fp32": round(ms["fp32"] / ms[key], 3) if "fp32" in ms else None, "reps": reps}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(out: dict) -> str:
    ms = {(r["model"], r["batch"], r["threads"], r["variant"]): r["ms"] for r in out["rows"]}
    cells = sorted({(r["model"], r["batch"], r["threads"]) for r in out["rows"]},
                   key=lambda c: (MODELS.index(c[0]) if c[0] in MODELS else 99, c[1], c[2]))
    lines = ["| network | batch | threads | FP32 ms | pdq W8A8 ms | ORT quantize_static ms | pdq / ORT ratio | "
             "FP32/pdq speedup | FP32/ORT speedup | pdq academic ms |", "|" + " --- |" * 10]
    for m, b, t in cells:
        fp, pq, st, ac = (ms.get((m, b, t, v)) for v in VARIANTS)
        ratio = pq / st if pq and st else None
        lines.append(f"| {m} | {b} | {t} | {_fmt(fp)} | {_fmt(pq)} | {_fmt(st)} | {_fmt(ratio, '.2f')} | "
                     f"{_fmt(fp / pq if fp and pq else None, '.2f')} | {_fmt(fp / st if fp and st else None, '.2f')} "
                     f"| {_fmt(ac)} |")
    labels = [*COUNTED, "DequantizeLinear of initializer", "Transpose"]
    lines += ["", "Operators in onnxruntime's optimized graph (ORT_ENABLE_ALL, CPU):", "",
              "| network | variant | " + " | ".join(labels) + " |", "|" + " --- |" * (2 + len(labels))]
    for r in out["ops"]:
        values = [_fmt(r["counts"].get(label), "d") for label in labels]
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(values) + " |")
    if out["accuracy"]:
        keys = [f"{v}_top1" for v in VARIANTS if any(f"{v}_top1" in a for a in out["accuracy"])]
        lines += ["", "| network | test images | " + " | ".join(keys) + " |", "|" + " --- |" * (2 + len(keys))]
        for a in out["accuracy"]:
            lines.append(f"| {a['model']} | {a['images']} | " + " | ".join(_fmt(a.get(k), '.2f') for k in keys) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import onnxruntime as ort
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "python": platform.python_version(), "onnxruntime": ort.__version__,
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "deploy.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]))
    ap.add_argument("--method", default="rtn_mse", help="pdq method of the pdq variant")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=100, help="timed calls per variant and cell (at most)")
    ap.add_argument("--min-reps", type=int, default=10, help="timed calls per variant and cell (at least)")
    ap.add_argument("--cell-seconds", type=float, default=3.0,
                    help="time budget of one cell's timed calls, all variants")
    ap.add_argument("--rounds", type=int, default=10, help="turns of each variant per cell")
    ap.add_argument("--settle-seconds", type=float, default=0.2,
                    help="untimed calls at the start of each turn, until this much time has passed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--accuracy", action="store_true", help="top-1 on the Fashion-MNIST test split (fmnist models)")
    args = ap.parse_args()
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]  # the reference and the source of ort_static
    import torch

    from pdq.io import atomic_write, atomic_write_json

    torch.set_num_threads(max(args.threads))
    t0 = time.time()
    out = {"rows": [], "ops": [], "accuracy": [], "builds": [], "machine": machine(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for name in args.models:
        bench_model(name, args, out)
        out["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(args.out, out)
    atomic_write(args.out.with_suffix(".md"), markdown(out))
    print(markdown(out))
    print(f"wall {out['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
