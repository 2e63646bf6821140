"""What the quantization code knows of a data-parallel run (`trainer=ddp`, `trainer=ddp_cpu`): `Dist` carries this
process's rank and the collectives the pipeline needs; `SINGLE` (one process) makes each of them a no-op, so the same
code runs with and without DDP. `state_sha256` and `compute_tag` are the digests that say whether results agree
(across ranks, or with a cache); `world_size_of` is the process count a trainer config asks for.

Where the processes come from, and the process group they join, is `pdq.launch` (the pipeline's only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from pdq.errors import PdqError

DDP_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")   # where collective tensors live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def progress_disable(self) -> bool | None:
        """tqdm's `disable`: off on ranks other than 0, else automatic (off when stderr is not a terminal)."""
        return True if not self.main else None

    def shard(self, n: int) -> slice:
        """This rank's contiguous, equal share of `n` items (n is a multiple of world_size)."""
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def head(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The first `n` rows of the concatenation of every rank's equal shard `local`, on every rank."""
        if not self.enabled:
            return local[:n]
        size, pieces = len(local), []
        for src in range(self.world_size):
            rows = min(size, n - src * size)
            if rows <= 0:
                break
            piece = (local[:rows].contiguous() if src == self.rank else
                     torch.empty((rows, *local.shape[1:]), dtype=local.dtype, device=local.device))
            tdist.broadcast(piece, src=src)
            pieces.append(piece)
        return torch.cat(pieces)

    def broadcast_quantizers(self, quantizers) -> None:
        """Rank 0's scales, zero points and init flags in `quantizers` (those an observer just fitted,
        in the same order on every rank): observer results are then the same on every rank."""
        if not self.enabled:
            return
        for q in quantizers:
            for t in (q.scale, q.zero_point, q.initialized):
                tdist.broadcast(t.data, src=0)

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum over ranks of a few numbers."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


SINGLE = Dist()


def tensor_bytes(t: torch.Tensor):
    """A tensor's bytes, in its logical order (a numpy uint8 array; on the host)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def state_sha256(module: nn.Module) -> str:
    """Digest of every parameter and buffer by name (the order of a module's buffers depends on its history:
    a learned scale is re-registered): equal on all ranks iff their quantization states are equal."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t).tobytes())
    return h.hexdigest()


def compute_tag(device: torch.device) -> str:
    """What float results depend on besides the inputs: the GPU model, or the CPU thread count (cache keys)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def world_size_of(trainer_cfg) -> int:
    """Processes a trainer config asks for (devices x num_nodes); a clear error for what DDP can't run."""
    strategy = trainer_cfg["strategy"]
    devices, nodes = trainer_cfg["devices"], trainer_cfg["num_nodes"]
    accelerator = trainer_cfg["accelerator"]
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise PdqError(f"trainer.num_nodes={nodes!r} is not accepted; accepted: a positive integer")
    if devices == -1 and accelerator in ("gpu", "cuda"):
        devices = torch.cuda.device_count()
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise PdqError(f"trainer.devices={trainer_cfg['devices']!r} is not accepted; accepted: a positive "
                       f"integer (the processes per node), or -1 for every visible GPU")
    world = devices * nodes
    if world > 1 and strategy not in DDP_STRATEGIES:
        raise PdqError(f"trainer.devices={devices} and trainer.num_nodes={nodes} with trainer.strategy="
                       f"{strategy!r}: several processes need a DDP strategy; accepted: {', '.join(DDP_STRATEGIES)} "
                       f"(use trainer=ddp for GPUs or trainer=ddp_cpu for CPU processes)")
    return world
