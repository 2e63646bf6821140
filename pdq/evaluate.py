"""Top-1 evaluation with a progress bar; in a DDP run each rank evaluates every world_size-th image and
the counts are summed. `fp_top1`: the float model's top-1, kept in the cache (`pdq.cache`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pdq.cache import entry
from pdq.distributed import SINGLE, Dist

log = logging.getLogger("pdq")


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


def fp_top1(model: nn.Module, loader: DataLoader, device: torch.device, *, cache_dir: str | Path | None,
            model_name: str, data: dict, dist: Dist = SINGLE) -> float:
    """The float model's top-1 (`evaluate`), kept in the cache's `fp_top1` namespace under `cache_dir` (None: no
    cache) so that the jobs of a sweep evaluate a model once. The key is the model name, its weights and
    buffers, the eval set's size, `data` (the data config, plain values), the torch version and the device
    type. Rank 0 reads and writes the cache and its answer goes to every rank; a miss is evaluated sharded over
    the ranks."""
    found = None
    if cache_dir and dist.main:
        found = entry(cache_dir, "fp_top1", {"model": model_name, "eval_images": len(loader.dataset), "data": data,
                                             "weights": model}, device)
    if cache_dir:
        cached = dist.broadcast(found.load(lambda raw: float(raw["fp_top1"])) if found is not None else None)
        if cached is not None:
            log.info("FP top-1: %.2f%% (cached in %s)", cached, found or cache_dir)
            return cached
    top1 = evaluate(model, loader, device, desc="FP eval", dist=dist)
    log.info("FP top-1: %.2f%%", top1)
    if found is not None:
        found.save({"fp_top1": top1, "model": model_name, "eval_images": len(loader.dataset)})
    return top1
