"""Top-1 evaluation with a progress bar."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over the whole loader."""
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        pred = model(x.to(device, non_blocking=True)).argmax(dim=1)
        correct += (pred.cpu() == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)
