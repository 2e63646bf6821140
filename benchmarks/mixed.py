"""Mixed-precision benchmark: allocation time, sensitivity time, and the additivity check.

    python benchmarks/mixed.py --out outputs/benchmarks/mixed.json

* allocation: `pdq.mixed.allocate` on random sensitivities of 100 layers x 4 widths, each budget kind (median
  of 5 after one warm-up call);
* sensitivity: `pdq sensitivity` for each model (default settings: 1,024 calibration images, widths 2/3/4/8);
* additivity: for each model and average-bit budget, the summed per-layer sensitivities of the allocation
  against the PD loss measured with all its layers quantized at once (weights only, as the sensitivity is
  measured), their Spearman rank correlation, and a scatter plot (`<out>.png`).
Not part of the test suite."""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

BUDGETS = (2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0)


def allocation_ms() -> dict[str, float]:
    from pdq.mixed import BUDGETS as KINDS
    from pdq.mixed import LayerCost, allocate
    from pdq.mixed.allocate import spent

    rng = random.Random(0)
    names = [f"l{i}" for i in range(100)]
    sens = {m: {b: rng.random() / b for b in (2, 3, 4, 8)} for m in names}
    costs = {m: LayerCost(rng.randint(100, 100000), rng.randint(10 ** 4, 10 ** 7), 4) for m in names}
    out = {}
    for kind in KINDS:
        value = (spent({m: 2 for m in names}, costs, kind) + spent({m: 8 for m in names}, costs, kind)) / 2
        allocate(sens, costs, kind, value)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            allocate(sens, costs, kind, value)
            times.append(1000 * (time.perf_counter() - t0))
        out[kind] = round(statistics.median(times), 1)
    return out


def additivity(model: str, run_dir: Path) -> list[dict]:
    import json

    import torch

    from pdq.mixed.allocate import LayerCost, allocate
    from pdq.mixed.sensitivity import batched_logits, pd_loss
    from pdq.models import build_model
    from pdq.quant import quantize_model
    from pdq.quant.quantizers import FakeQuantizer

    table = json.loads((run_dir / "sensitivity.json").read_text())
    sens = {n: {int(b): v for b, v in row.items()} for n, row in table["weights"].items()}
    from pdq.data.fashion_mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule()
    dm.prepare_data()
    dm.setup()
    settings = table["settings"]
    images = dm.calibration_set(settings["calib_size"], settings["seed"])
    from hydra import compose, initialize_config_dir

    from pdq.errors import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        observer = instantiate(compose("config", overrides=["quant=mixed"]).quant.weight_observer)
    gm = quantize_model(build_model(model)).eval()
    costs = {n: LayerCost(gm.get_submodule(n).weight.numel(), 0, 8) for n in [*sens, *table["fixed"]]}
    g = copy.deepcopy(gm)
    for q in g.modules():
        if isinstance(q, FakeQuantizer):
            q.enabled = False
    with torch.no_grad():
        fp = batched_logits(g, images, 256)
    rows = []
    for budget in BUDGETS:
        widths = allocate({**sens, **{n: {b: 0.0} for n, b in table["fixed"].items()}}, costs, "avg_w_bits", budget,
                          table["fixed"])
        trial = copy.deepcopy(g)
        for name, bits in widths.items():
            if name in sens:
                wq = trial.get_submodule(name).weight_quant
                wq.bits, wq.enabled = bits, True
                wq.observe(trial.get_submodule(name).weight, observer)  # the sensitivity's own observer
        with torch.no_grad():
            measured = pd_loss(trial, images, fp, 256, settings["temperature"])
        rows.append({"model": model, "avg_w_bits": budget, "summed": sum(sens[n][widths[n]] for n in sens),
                     "measured": measured})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "mixed.json")
    ap.add_argument("--models", nargs="+", default=["resnet20_fmnist", "mobilenetv2_fmnist"])
    args = ap.parse_args()
    from scipy.stats import spearmanr

    from pdq.figures import figure, png
    from pdq.io import atomic_write, atomic_write_json
    from pdq.mixed.cli import sensitivity_run

    out = {"allocation_ms_100x4": allocation_ms(), "sensitivity_s": {}, "additivity": []}
    print(out["allocation_ms_100x4"], flush=True)
    for model in args.models:
        run_dir = args.out.parent / f"sensitivity_{model}"
        t0 = time.time()
        sensitivity_run([f"model={model}"], run_dir)
        out["sensitivity_s"][model] = round(time.time() - t0, 1)
        print(model, out["sensitivity_s"][model], "s", flush=True)
        rows = additivity(model, run_dir)
        out["additivity"] += rows
        out[f"spearman_{model}"] = round(float(spearmanr([r["summed"] for r in rows],
                                                         [r["measured"] for r in rows]).statistic), 4)
    fig, axes = figure(1, 1, 4.5, 4)
    ax = axes[0][0]
    for model in args.models:
        rows = [r for r in out["additivity"] if r["model"] == model]
        ax.loglog([r["summed"] for r in rows], [r["measured"] for r in rows], "o-", label=model)
    ax.set_xlabel("summed per-layer PD loss")
    ax.set_ylabel("measured PD loss, all layers at once")
    ax.legend(fontsize=7)
    atomic_write(args.out.with_suffix(".png"), png(fig))
    atomic_write_json(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
