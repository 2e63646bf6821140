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


def fp_top1(model: nn.Module, test_loader: DataLoader, device: torch.device, cfg, dist: Dist = SINGLE) -> float:
    """FP top-1, computed once per (model weights, data config) and kept in `paths.cache_dir` (null: no
    cache), so that the jobs of a sweep do not re-evaluate the same float model. Rank 0 reads and
    writes the cache; a miss is evaluated sharded over the ranks."""
    import hashlib
    import json
    import logging
    from pathlib import Path

    from omegaconf import OmegaConf

    from pdq.distributed import state_sha256
    from pdq.io import atomic_write_json

    log = logging.getLogger("pdq")
    cache_dir = cfg.paths.get("cache_dir")
    path = None
    if cache_dir:
        h = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True).encode())
        h.update(str(len(test_loader.dataset)).encode())
        h.update(state_sha256(model).encode())
        path = Path(cache_dir) / "fp_top1" / f"{h.hexdigest()[:32]}.json"
        cached = dist.broadcast(float(json.loads(path.read_text())["fp_top1"]) if path.is_file() else None)
        if cached is not None:
            log.info("FP top-1: %.2f%% (cached in %s)", cached, path)
            return cached
    top1 = evaluate(model, test_loader, device, desc="FP eval", dist=dist)
    log.info("FP top-1: %.2f%%", top1)
    if path is not None and dist.main:
        atomic_write_json(path, {"fp_top1": top1, "model": cfg.model.name, "eval_images": len(test_loader.dataset)})
    return top1
