"""Top-1 evaluation with a progress bar; in a DDP run each rank evaluates every world_size-th image and
the counts are summed."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pdq.distributed import SINGLE, Dist


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval",
             dist: Dist = SINGLE) -> float:
    """Top-1 accuracy in percent over the whole loader."""
    model.eval()
    if dist.enabled:
        loader = DataLoader(Subset(loader.dataset, range(dist.rank, len(loader.dataset), dist.world_size)),
                            batch_size=loader.batch_size, num_workers=loader.num_workers,
                            pin_memory=loader.pin_memory)
    correct = total = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=dist.progress_disable):
        pred = model(x.to(device, non_blocking=True)).argmax(dim=1)
        correct += (pred.cpu() == y).sum().item()
        total += y.numel()
    correct, total = dist.sum(correct, total)
    return 100.0 * correct / max(total, 1)
