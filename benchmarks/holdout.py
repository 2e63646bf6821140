"""Top-1 of finished Fashion-MNIST runs on a held-out part of the training split: the last `--images` training
images, less the run's own calibration images (drawn by its seed). Choose settings with this, never with the
test split; the test split then reports them once. The reference models were trained on the whole training
split, so these images are not new to the float model (its top-1 there is near its training accuracy), but they
are new to quantization. One line per run dir: `name | holdout images | top-1 %`.

    python benchmarks/holdout.py outputs/runs/<run> [<run> ...] --images 10000

Not part of the test suite."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def holdout_top1(run_dir: Path, images: int) -> tuple[int, float]:
    """How many held-out images the run is evaluated on, and its top-1 % there."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    from pdq.data.calib import draw_indices
    from pdq.data.fashion_mnist import FashionMNISTDataModule, normalize
    from pdq.errors import PdqError
    from pdq.evaluate import evaluate
    from pdq.export.checkpoint import load_with_meta

    results = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.create(results["config"])
    dm = instantiate(cfg.data)
    if not isinstance(dm, FashionMNISTDataModule):
        raise PdqError(f"{run_dir}: data={type(dm).__name__}; accepted: Fashion-MNIST runs")
    x, y = dm.split("train")
    if not 0 < images <= len(x):
        raise PdqError(f"--images={images} is not accepted; accepted: 1..{len(x)} (the training split's size)")
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[: len(x) - images] = False
    keep[draw_indices(len(x), results["calib_size"], results["seed"])] = False
    loader = DataLoader(TensorDataset(normalize(x[keep]), y[keep]), batch_size=1000)
    gm, _ = load_with_meta(run_dir)
    return int(keep.sum()), evaluate(gm, loader, torch.device("cpu"), desc=run_dir.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run dirs")
    ap.add_argument("--images", type=int, default=10000, help="the last N training images (default: 10000)")
    args = ap.parse_args()
    for run_dir in args.runs:
        n, top1 = holdout_top1(run_dir, args.images)
        print(f"{run_dir.name} | {n} | {top1:.2f}", flush=True)


if __name__ == "__main__":
    main()
