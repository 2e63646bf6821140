"""Train an embedded reference model on the real Fashion-MNIST training split and write its checkpoint.

    python scripts/train_reference.py --model resnet20_fmnist     # ~20 min on a 2-core CPU
    python scripts/train_reference.py --model mobilenetv2_fmnist

Recipe (both models): SGD, Nesterov momentum 0.9, weight decay 5e-4 (not on BN/bias), batch 128,
one-cycle LR peaking at 0.1, 10 epochs, augmentation = random 28x28 crop of the 2-pixel-padded image
+ horizontal flip, seed 0. The checkpoint goes to pdq/models/checkpoints/<model>.pt (atomically) and
its SHA-256 into pdq/models/checkpoints/SHA256SUMS.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from pdq.data.fashion_mnist import FashionMNISTDataModule, normalize
from pdq.io import atomic_torch_save
from pdq.models import build_model
from pdq.models.registry import CHECKPOINT_DIR, EMBEDDED


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop of the padded image + horizontal flip, per sample, drawn from `g`."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    x = x.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def test_top1(model, dm) -> float:
    model.eval()
    correct = total = 0
    for x, y in dm.test_dataloader():
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def train(make_model: Callable[[], torch.nn.Module], args: argparse.Namespace) -> tuple[torch.nn.Module, float, float]:
    """The recipe of the module docstring on the real training split, seeded by `args.seed` (the model is
    built after seeding); returns the trained model, its final test top-1 and when training started."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    dm = FashionMNISTDataModule()
    x_all, y_all = dm.split("train")
    x_all = normalize(x_all)
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    nb = len(x_all) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * nb, pct_start=0.25)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=g)
        running = 0.0
        for b in range(nb):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_all[idx], g)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        acc = test_top1(model, dm)
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / nb:.4f} test top-1 {acc:.2f}% "
              f"({time.time() - t0:.0f}s)", flush=True)
    return model, acc, t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(EMBEDDED), required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="checkpoint path (default: the bundled one)")
    args = ap.parse_args()

    model, acc, t0 = train(partial(build_model, args.model, pretrained=False), args)
    out = args.out or CHECKPOINT_DIR / f"{args.model}.pt"
    recipe = {k: v for k, v in vars(args).items() if k != "out"}
    atomic_torch_save({"arch": args.model, "state_dict": model.state_dict(), "recipe": recipe,
                       "test_top1": acc, "train_seconds": round(time.time() - t0)}, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} sha256 {digest} test top-1 {acc:.2f}%")
    if args.out is None:
        sums = CHECKPOINT_DIR / "SHA256SUMS"
        lines = [ln for ln in (sums.read_text().splitlines() if sums.exists() else [])
                 if not ln.endswith(f"  {out.name}")]
        sums.write_text("\n".join(sorted(lines + [f"{digest}  {out.name}"])) + "\n")


if __name__ == "__main__":
    main()
