"""The processes of a data-parallel run (`trainer=ddp`, `trainer=ddp_cpu`): one process per GPU, or per share of the
CPU cores, in one process group that every unit's Lightning fit joins instead of launching its own. Only the pipeline
uses this module (`session`); the quantization code sees the `pdq.distributed.Dist` that `session` yields.

Where the processes come from:
* `torchrun`, or SLURM `srun` with one task per device: they exist already; their environment says which rank each is
  (Lightning's `TorchElasticEnvironment` / `SLURMEnvironment` read it).
* `pdq trainer=ddp_cpu trainer.devices=2` on one machine: this process is rank 0 and starts ranks 1.. as
  copies of the same Hydra job (same overrides, same run dir), with `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and
  `MASTER_PORT` set, as Lightning's own launcher does. Lightning's `LightningEnvironment` then sees processes created
  externally, so each unit's Trainer reuses the group (its launcher cannot do this for more than one `fit`).

When a rank this process started fails, the run ends here as any error ends it. A watcher thread sees the rank exit,
kills the other ranks (a collective that waits for them then fails at once) and interrupts the main thread, where
`session` raises a `PdqError` naming the rank and its exit code: on its way out the pipeline finishes the logger and
the `pdq` command logs the error. So that no rank that failed while starting leaves this process waiting in
`init_process_group` (which no signal interrupts), this process creates the group's store itself and waits, in Python,
until every rank it started has checked in. A rank started by this process ends itself if this process dies (it
writes no file and has no logger of its own).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from pdq.distributed import SINGLE, Dist, world_size_of
from pdq.errors import PdqError
from pdq.process import restore_environment, set_environment

log = logging.getLogger("pdq")
TIMEOUT = datetime.timedelta(minutes=30)
#: how often the watcher threads look at the other processes, and the launcher at the ranks that checked in (seconds)
POLL_S = 0.5
#: after an error in this process, how long a rank that died before it may take to be seen as exited (seconds)
EXIT_GRACE_S = 1.0
#: the signal the rank watcher sends the main thread (a real signal, so that a wait there, e.g. a sleep, is cut short);
#: its handler is pdq's for the session only
INTERRUPT = signal.SIGUSR2
#: the store key a rank started by this process sets before it joins the process group
JOINED_KEY = "pdq/joined/{rank}"


class _RankFailed(BaseException):
    """Raised in the launching process's main thread when a rank it started has failed (at most once per run). A
    BaseException, as a KeyboardInterrupt is, so that no `except Exception` on the way holds it up; not a
    KeyboardInterrupt, which Lightning's fit turns into sys.exit(1) (ignoring Ctrl-C from then on). `session` turns it
    into a PdqError."""

    def __init__(self, rank: int, code: int):
        super().__init__(rank, code)
        self.rank, self.code = rank, code


class _Ranks:
    """Ranks 1..world-1 as started by this process, and the watcher thread that stops the run when one of them fails:
    it records the first rank that exited with an error, kills the others, and (between `arm` and `disarm`) raises
    `_RankFailed` in the main thread."""

    def __init__(self, children: list[subprocess.Popen]):
        self.children = children
        #: (rank, exit code) of the first rank that exited with an error before this process killed any
        self.failed: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._killed = False
        self._stop = threading.Event()
        self._armed = False     # written by the main thread only
        self._pending = False   # the watcher has sent INTERRUPT, whose handler has not run yet
        self._installed = False
        self._previous = None   # the INTERRUPT handler before `arm`
        self._main = threading.main_thread().ident
        self._watcher = threading.Thread(target=self._watch, name="pdq-rank-watcher", daemon=True)
        self._watcher.start()

    def poll(self) -> tuple[int, int] | None:
        """`failed`, after a look at the ranks."""
        with self._lock:
            if self.failed is None and not self._killed:
                for rank, child in enumerate(self.children, start=1):
                    code = child.poll()
                    if code not in (None, 0):
                        self.failed = (rank, code)
                        break
            return self.failed

    def first_failure(self, grace_s: float = EXIT_GRACE_S) -> tuple[int, int] | None:
        """`failed`, waiting up to `grace_s` for it: when this process's error came from a rank that died (a
        collective saw its connection close), that rank may not have been reaped yet."""
        deadline = time.monotonic() + grace_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failed

    def check(self) -> None:
        """Raise `_RankFailed` if a rank has failed (in waits of this process, whichever thread runs them)."""
        failed = self.poll()
        if failed is not None:
            self._armed = False
            raise _RankFailed(*failed)

    def kill(self) -> None:
        """Kill the ranks still running (they would wait for this process or a dead rank in a collective)."""
        with self._lock:
            self._killed = True
            for child in self.children:
                if child.poll() is None:
                    child.kill()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            failed = self.poll()
            if failed is not None:
                log.error("rank %d exited with code %d; stopping the run", *failed)
                self.kill()
                if self._armed:
                    self._pending = True
                    signal.pthread_kill(self._main, INTERRUPT)
                return

    def arm(self) -> None:
        """Until `disarm`, a failed rank raises `_RankFailed` in this thread, wherever it runs Python code. Only the
        main thread can be interrupted (Python runs signal handlers there); from another thread a failed rank ends the
        run when a collective that waits for it fails."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(INTERRUPT, self._on_interrupt)
        self._installed = self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def _on_interrupt(self, signum, frame) -> None:
        if self._pending:  # the watcher's signal
            self._pending = False
            # not after `disarm`, nor while this thread handles an error (a Ctrl-C, the collective that saw the rank
            # die, ...): the run is ending already, and its cleanup (the logger's finish) must not be cut short;
            # `session` names the failed rank on the way out
            if self._armed and self.failed is not None and sys.exc_info()[1] is None:
                self._armed = False
                raise _RankFailed(*self.failed)
            return
        # a real INTERRUPT signal from outside: what the handler before `arm` does with it
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def stop(self) -> None:
        """End the watcher; then put back the INTERRUPT handler (None before: the default)."""
        self._armed = False
        self._stop.set()
        self._watcher.join()
        if not self._installed:
            return
        deadline = time.monotonic() + 1.0
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)  # Python runs the pending handler when the sleep ends: the watcher's call is consumed
        if not self._pending:  # else the handler stays, to take the call that has not run yet
            signal.signal(INTERRUPT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def wait(self) -> list[int]:
        return [child.wait() for child in self.children]


def failed_message(rank: int, code: int) -> str:
    how = f"exited with code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how += f" (killed by {signal.Signals(-code).name})"
    return (f"rank {rank} {how}; the run was stopped on every rank (rank {rank}'s own error, if it reported one, is in "
            f"the output above)")


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


def child_command(out_dir: Path) -> list[str]:
    """This Hydra job again, started as this process was (`python run.py`, `python -m ...` or an installed
    script), in the same run dir, writing neither Hydra files nor a log file of its own."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise PdqError("a multi-process run (trainer.devices > 1) starts its ranks through the `pdq` command (or "
                       "`python run.py`); accepted otherwise: processes started by torchrun or srun")
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    launch = argv[1:len(argv) - (len(sys.argv) - 1)]  # the interpreter's own options and the script or -m module
    overrides = list(HydraConfig.get().overrides.task)
    return [sys.executable, *launch, *overrides, f"hydra.run.dir={out_dir}", "hydra.output_subdir=null",
            "hydra/job_logging=stdout", "hydra/hydra_logging=none"]


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """In a rank started by another process: end this process when that one is gone (this rank writes no file
    and has no logger; it would otherwise wait for the dead process in a collective)."""
    while not stop.wait(POLL_S):
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
    """The `Dist` of this process for the run's duration (one process: `SINGLE`, nothing started). When this process
    starts the other ranks, the environment variables and thread count it changes are put back after, so that the
    next job of a sequential multirun starts its own ranks again; a rank that fails ends the run with a PdqError
    naming it (see the module docstring)."""
    world = world_size_of(trainer_cfg)
    if world == 1:
        yield SINGLE
        return
    try:
        with _group(trainer_cfg, out_dir, world) as dist:
            yield dist
    except _RankFailed as e:  # raised at most once, wherever the main thread was: here whatever it interrupted is over
        raise PdqError(failed_message(e.rank, e.code)) from None


@contextlib.contextmanager
def _group(trainer_cfg, out_dir: Path, world: int):
    gpu = trainer_cfg.accelerator in ("gpu", "cuda")
    nodes = trainer_cfg.num_nodes
    devices = world // nodes
    saved_threads = torch.get_num_threads()
    ranks = store = None
    stop = threading.Event()
    ok = False
    try:
        if "LOCAL_RANK" not in os.environ and _external_environment() is None:
            ranks, store, saved_env = _spawn_ranks(world, nodes, gpu, out_dir)
            ranks.arm()
        elif "PDQ_PARENT_PID" in os.environ:
            threading.Thread(target=_watch_parent, args=(int(os.environ["PDQ_PARENT_PID"]), stop),
                             daemon=True).start()
        env = _environment(world, devices)
        backend = "nccl" if gpu else "gloo"
        device = torch.device("cuda", env.local_rank()) if gpu else torch.device("cpu")
        if gpu:
            torch.cuda.set_device(device)
        _join_group(backend, env, world, ranks, store)
        dist = Dist(rank=env.global_rank(), world_size=world, local_rank=env.local_rank(), device=device)
        with _rank_scope(dist):
            log.info("DDP: %d processes (%s), rank %d", world, backend, dist.rank)
            yield dist
            tdist.barrier()
        ok = True
    except Exception:  # an error, maybe from a collective that a dead rank left: say which rank died, if one did
        if ranks is not None:
            ranks.disarm()
            failed = ranks.first_failure()
            if failed is not None:  # this process's error came from the rank that died
                raise PdqError(failed_message(*failed)) from None
        raise
    finally:
        stop.set()
        if ranks is not None:
            ranks.stop()
            if not ok:
                ranks.kill()
        if tdist.is_initialized():
            tdist.destroy_process_group()
        if ranks is not None:
            restore_environment(saved_env)
            torch.set_num_threads(saved_threads)
            failed = next(((r, c) for r, c in enumerate(ranks.wait(), start=1) if c != 0), None)
            if ok and failed is not None:
                raise PdqError(failed_message(*failed))


def _join_group(backend: str, env, world: int, ranks: _Ranks | None, store) -> None:
    """Join the process group: ranks started by torchrun or srun through Lightning's environment's address; the ranks
    this process starts through its store, which this process (rank 0) creates, once every rank has checked in."""
    rank = env.global_rank()
    if ranks is None and "PDQ_PARENT_PID" not in os.environ:  # torchrun, srun
        tdist.init_process_group(backend, init_method=f"tcp://{env.main_address}:{env.main_port}", rank=rank,
                                 world_size=world, timeout=TIMEOUT)
        return
    if ranks is None:  # a rank started by rank 0
        store = tdist.TCPStore(env.main_address, env.main_port, world, is_master=False, timeout=TIMEOUT)
        store.set(JOINED_KEY.format(rank=rank), "1")
    else:
        keys = [JOINED_KEY.format(rank=r) for r in range(1, world)]
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while not store.check(keys):
            ranks.check()
            if time.monotonic() > deadline:
                raise PdqError(f"the ranks this process started did not all start within {TIMEOUT} (joined: "
                               f"{[r for r in range(1, world) if store.check([JOINED_KEY.format(rank=r)])]})")
            time.sleep(0.05)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def _spawn_ranks(world: int, nodes: int, gpu: bool, out_dir: Path):
    """Start ranks 1..world-1 of a one-node run as copies of this Hydra job; this process becomes rank 0. Returns the
    ranks, the store of the process group (its server, in this process) and the environment variables as they were
    (for `restore_environment`; put back here if a rank cannot be started)."""
    if nodes > 1:
        raise PdqError(f"trainer.num_nodes={nodes} needs its processes started on every node by srun (SLURM) "
                       f"or torchrun; accepted when pdq starts them itself: trainer.num_nodes=1")
    command = child_command(out_dir)
    threads = None if ("OMP_NUM_THREADS" in os.environ or gpu) else max(1, (os.cpu_count() or 1) // world)
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = tdist.TCPStore(address, int(os.environ.get("MASTER_PORT", 0)), world, is_master=True, timeout=TIMEOUT,
                           wait_for_workers=False)  # port 0: a free port, taken at once
    saved_threads = torch.get_num_threads()
    saved_env = set_environment(LOCAL_RANK="0", NODE_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR=address,
                                MASTER_PORT=str(store.port))
    children: list[subprocess.Popen] = []
    try:
        if threads:
            torch.set_num_threads(threads)
        for r in range(1, world):
            env = {**os.environ, "LOCAL_RANK": str(r), "PDQ_PARENT_PID": str(os.getpid())}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            children.append(subprocess.Popen(command, env=env))
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        restore_environment(saved_env)
        torch.set_num_threads(saved_threads)
        raise
    return _Ranks(children), store, saved_env
