"""Train torchvision's ShuffleNetV2 x0.5, adapted to 1x28x28 Fashion-MNIST, briefly: the "any CNN" model of
the README's generic-units measurement (channel split, concat and channel shuffle in every block).

    python -m scripts.train_shufflenet_fmnist --out outputs/shufflenet_fmnist.pt   # from the repo root

Adaptation: the stem is a 1-channel 3x3 stride-1 conv and the stem max-pool is removed (28x28 inputs
reach the last stage at 4x4); 10 classes. Recipe: the embedded models' (scripts/train_reference.py: SGD
Nesterov 0.9, weight decay 5e-4 except BN/bias, batch 128, one-cycle LR peaking at 0.1, random crop +
flip), 3 epochs, seed 0. Quantize it with
`pdq model=custom model.target=scripts.train_shufflenet_fmnist.shufflenet_fmnist
model.checkpoint=outputs/shufflenet_fmnist.pt`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torchvision
from torch import nn


def shufflenet_fmnist(num_classes: int = 10) -> nn.Module:
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=num_classes)
    model.conv1[0] = nn.Conv2d(1, model.conv1[0].out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def main() -> None:
    from pdq.io import atomic_torch_save
    from scripts.train_reference import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/shufflenet_fmnist.pt"))
    args = ap.parse_args()

    model, acc, t0 = train(shufflenet_fmnist, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"state_dict": model.state_dict(), "recipe": {k: str(v) for k, v in vars(args).items()},
                       "test_top1": acc, "train_seconds": round(time.time() - t0)}, args.out)
    print(f"wrote {args.out} test top-1 {acc:.2f}%")


if __name__ == "__main__":
    main()
