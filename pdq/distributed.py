"""Data-parallel runs (`trainer=ddp`, `trainer=ddp_cpu`): one process per GPU, or per share of the CPU
cores, in one process group that every unit's Lightning fit joins instead of launching its own.

Where the processes come from:
* `torchrun`, or SLURM `srun` with one task per device: they exist already; their environment says
  which rank each is (Lightning's `TorchElasticEnvironment` / `SLURMEnvironment` read it).
* `python run.py trainer=ddp_cpu trainer.devices=2` on one machine: this process is rank 0 and starts
  ranks 1.. as copies of the same Hydra job (same overrides, same run dir), with `LOCAL_RANK`,
  `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` set, as Lightning's own launcher does. Lightning's
  `LightningEnvironment` then sees processes created externally, so each unit's Trainer reuses the
  group (its launcher cannot do this for more than one `fit`).

`Dist` carries the rank and the collectives the pipeline needs; `SINGLE` (one process) makes each of
them a no-op, so the same code runs with and without DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from pdq.errors import PdqError

log = logging.getLogger("pdq")
DDP_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true")
TIMEOUT = datetime.timedelta(minutes=30)


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


def state_sha256(module: nn.Module) -> str:
    """Digest of every parameter and buffer by name (the order of a module's buffers depends on its history:
    a learned scale is re-registered): equal on all ranks iff their quantization states are equal."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_tag(device: torch.device) -> str:
    """What float results depend on besides the inputs: the GPU model, or the CPU thread count (cache keys)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def world_size_of(trainer_cfg) -> int:
    """Processes a trainer config asks for (devices x num_nodes); a clear error for what DDP can't run."""
    strategy = trainer_cfg.get("strategy", "auto")
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    accelerator = trainer_cfg.get("accelerator", "cpu")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise PdqError(f"trainer.num_nodes={nodes!r} is not accepted; accepted: a positive integer")
    if devices == -1 and accelerator in ("gpu", "cuda"):
        devices = torch.cuda.device_count()
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise PdqError(f"trainer.devices={trainer_cfg.get('devices')!r} is not accepted; accepted: a positive "
                       f"integer (the processes per node), or -1 for every visible GPU")
    world = devices * nodes
    if world > 1 and strategy not in DDP_STRATEGIES:
        raise PdqError(f"trainer.devices={devices} and trainer.num_nodes={nodes} with trainer.strategy="
                       f"{strategy!r}: several processes need a DDP strategy; accepted: {', '.join(DDP_STRATEGIES)} "
                       f"(use trainer=ddp for GPUs or trainer=ddp_cpu for CPU processes)")
    return world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _external_environment():
    """The cluster environment of processes started by torchrun or srun (Lightning's order), else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for env_type in (TorchElasticEnvironment, SLURMEnvironment):
        if env_type.detect():
            return env_type()
    return None


def _environment(world: int, devices: int):
    """Lightning's cluster environment for this process, as Lightning's Trainer will pick it."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = _external_environment()
    if env is not None:
        if env.world_size() != world:
            raise PdqError(f"{type(env).__name__} reports {env.world_size()} processes but trainer.devices x "
                           f"trainer.num_nodes = {world}; accepted: one task per device (SLURM "
                           f"--ntasks-per-node=trainer.devices, torchrun --nproc-per-node=trainer.devices)")
        return env
    env = LightningEnvironment()
    env.set_world_size(world)
    env.set_global_rank(int(os.environ.get("NODE_RANK", 0)) * devices + env.local_rank())
    return env


def _child_command(out_dir: Path) -> list[str]:
    """This Hydra job again, started as this process was (`python run.py`, `python -m ...` or an installed
    script), in the same run dir, writing neither Hydra files nor a log file of its own."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise PdqError("a multi-process run (trainer.devices > 1) starts its ranks through `python run.py`; "
                       "accepted otherwise: processes started by torchrun or srun")
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    launch = argv[1:len(argv) - (len(sys.argv) - 1)]  # the interpreter's own options and the script or -m module
    overrides = list(HydraConfig.get().overrides.task)
    return [sys.executable, *launch, *overrides, f"hydra.run.dir={out_dir}", "hydra.output_subdir=null",
            "hydra/job_logging=stdout", "hydra/hydra_logging=none"]


def _watch_children(children: list[subprocess.Popen], stop: threading.Event) -> None:
    """If a rank dies, the others would wait for it in a collective: end the run at once."""
    while not stop.wait(0.5):
        for r, child in enumerate(children, start=1):
            code = child.poll()
            if code not in (None, 0):
                log.error("rank %d exited with code %d; stopping the run", r, code)
                for other in children:
                    if other.poll() is None:
                        other.kill()
                os._exit(1)


def _watch_parent(parent: int, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent:
            os._exit(1)


@contextlib.contextmanager
def _rank_scope(dist: Dist):
    """For one session: Lightning's rank-zero switch says this process's rank, and pdq's log is quiet on
    ranks other than 0. Both are restored after."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    pdq_log = logging.getLogger("pdq")
    saved_rank, saved_level = getattr(rank_zero_only, "rank", 0), pdq_log.level
    rank_zero_only.rank = dist.rank
    if not dist.main:
        pdq_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        rank_zero_only.rank = saved_rank
        pdq_log.setLevel(saved_level)


@contextlib.contextmanager
def session(trainer_cfg, out_dir: Path):
    """The `Dist` of this process for the run's duration (one process: `SINGLE`, nothing started). When
    this process starts the other ranks, the environment and thread count it changes are restored after,
    so that the next job of a sequential multirun starts its own ranks again."""
    world = world_size_of(trainer_cfg)
    if world == 1:
        yield SINGLE
        return
    gpu = trainer_cfg.get("accelerator", "cpu") in ("gpu", "cuda")
    nodes = trainer_cfg.get("num_nodes", 1)
    devices = world // nodes
    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    children: list[subprocess.Popen] = []
    stop = threading.Event()
    ok = False
    try:
        if "LOCAL_RANK" not in os.environ and _external_environment() is None:
            children = _spawn_ranks(world, nodes, gpu, out_dir, stop)
        elif "PDQ_PARENT_PID" in os.environ:
            threading.Thread(target=_watch_parent, args=(int(os.environ["PDQ_PARENT_PID"]), stop),
                             daemon=True).start()
        env = _environment(world, devices)
        backend = "nccl" if gpu else "gloo"
        device = torch.device("cuda", env.local_rank()) if gpu else torch.device("cpu")
        if gpu:
            torch.cuda.set_device(device)
        tdist.init_process_group(backend, init_method=f"tcp://{env.main_address}:{env.main_port}",
                                 rank=env.global_rank(), world_size=world, timeout=TIMEOUT)
        dist = Dist(rank=env.global_rank(), world_size=world, local_rank=env.local_rank(), device=device)
        with _rank_scope(dist):
            log.info("DDP: %d processes (%s), rank %d", world, backend, dist.rank)
            yield dist
            tdist.barrier()
        ok = True
    finally:
        stop.set()
        if tdist.is_initialized():
            tdist.destroy_process_group()
        if children:
            os.environ.clear()
            os.environ.update(saved_env)
            torch.set_num_threads(saved_threads)
        for child in children:
            if not ok and child.poll() is None:
                child.kill()
            code = child.wait()
            if ok and code != 0:
                raise RuntimeError(f"a rank exited with code {code}")


def _spawn_ranks(world: int, nodes: int, gpu: bool, out_dir: Path, stop: threading.Event) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 of a one-node run as copies of this Hydra job; this process becomes rank 0."""
    if nodes > 1:
        raise PdqError(f"trainer.num_nodes={nodes} needs its processes started on every node by srun (SLURM) "
                       f"or torchrun; accepted when run.py starts them itself: trainer.num_nodes=1")
    command = _child_command(out_dir)
    threads = None if ("OMP_NUM_THREADS" in os.environ or gpu) else max(1, (os.cpu_count() or 1) // world)
    os.environ.update(LOCAL_RANK="0", NODE_RANK="0", WORLD_SIZE=str(world),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if threads:
        torch.set_num_threads(threads)
    children = []
    for r in range(1, world):
        env = {**os.environ, "LOCAL_RANK": str(r), "PDQ_PARENT_PID": str(os.getpid())}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        children.append(subprocess.Popen(command, env=env))
    threading.Thread(target=_watch_children, args=(children, stop), daemon=True).start()
    return children

