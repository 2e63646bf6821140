"""Where a finished run loses its accuracy: the top-1 of its quantized model with only its first k units quantized
(k = 0 .. all), the later layers back to the float model's (folded) weights with their weight and activation
quantizers off. One row per run dir, on the run's own evaluation data (its data config).

    python benchmarks/unit_prefix.py outputs/runs/<run> [<run> ...] --images 2000

The units are the run's first pattern's (`block` for PD-Quant, QDrop, BRECQ). A diagnostic on the test split: never
use it to choose settings. Not part of the test suite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def prefix_top1(run_dir: Path, images: int | None) -> tuple[list[str], list[float]]:
    """The unit names and the top-1 % with units 0..k-1 quantized, for k = 0 .. all."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pdq.evaluate import evaluate
    from pdq.export.checkpoint import load_with_meta
    from pdq.quant import quantize_model
    from pdq.quant.graph import act_quant_names, quant_layer_names
    from pdq.recon.units import find_units

    results = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.create(results["config"])
    cfg.data.eval_subset = images
    loader = instantiate(cfg.data).test_dataloader()
    gm, _ = load_with_meta(run_dir)
    fresh = quantize_model(instantiate(cfg.model), backend=results.get("backend", "academic"))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    node = {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}
    units = find_units(gm, cfg.method.get("pattern", "block"), cfg.method.get("unit_merges", 0))
    quantized = {k: v.clone() for k, v in gm.state_dict().items()}
    row = []
    for k in range(len(units) + 1):
        gm.load_state_dict(quantized)
        cut = order[units[k - 1].output.name] if k else -1
        for name in quant_layer_names(gm):
            layer, on = gm.get_submodule(name), order[node[name]] <= cut
            layer.weight_quant.enabled = on
            if not on:
                layer.weight.data.copy_(fresh.get_submodule(name).weight.data)
        for name in act_quant_names(gm):
            gm.get_submodule(name).enabled = order[node[name]] <= cut
        row.append(evaluate(gm, loader, torch.device("cpu"), desc=f"{run_dir.name} {k}"))
    return [u.name for u in units], row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run dirs")
    ap.add_argument("--images", type=int, default=None, help="the first N evaluation images (default: all)")
    args = ap.parse_args()
    for run_dir in args.runs:
        names, row = prefix_top1(run_dir, args.images)
        if run_dir == args.runs[0]:
            print("run | none | " + " | ".join(names))
        print(f"{run_dir.name} | " + " | ".join(f"{v:.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
