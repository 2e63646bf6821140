"""Data-parallel reconstruction (trainer=ddp_cpu): two gloo processes end with bit-identical quantized models,
match one process, write only rank 0's outputs, and resume after a kill; DC and the gathering helpers give
one process's result from shards; bad DDP settings stop with one clear error; a rank that fails ends the run
through the normal exit path (the error naming it, the logger finished)."""

import json
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from pdq.distributed import SINGLE, Dist, world_size_of
from pdq.errors import PdqError
from pdq.pipeline import run
from pdq.recon.dc import correct
from pdq.resume import STATE_FILE
from tests.conftest import ROOT, kill_after_unit, make_dc, run_cli

CELL = ["method=qdrop", "method.iters=10", "method.learn_weight_scale=true", "method.steps=adaptive",
        "method.step_budget=0.5", "method.unit_merges=1", "quant=w2a4", "calib.size=64", "calib.act_init_size=32",
        "data.eval_subset=1000", "paths.cache_dir=null", "logger=csv"]
RUN = ["trainer=ddp_cpu", "trainer.devices=2", *CELL]


def files_of(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same cell with one process and with two (global batch 32 both times), one thread per process."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = base / "one", base / "two"
    for d, args in ((one, ["trainer=cpu", *CELL]), (two, RUN)):
        proc = run_cli(*args, f"hydra.run.dir={d}", OMP_NUM_THREADS="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def test_two_processes_end_identical_and_match_one_process(runs):
    one, two = runs
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in runs)
    assert r2["world_size"] == 2 and len(r2["peak_mib_per_rank"]) == 2
    sha = r2["rank_state_sha256"]
    assert len(sha) == 2 and sha[0] == sha[1]  # all-reduced gradients: same AdaRound and scale values
    assert r2["fp_top1"] == r1["fp_top1"] and r2["eval_images"] == 1000  # sharded eval, counts summed
    # one step plan on every rank, the one a single process makes; a merged unit among them
    assert [(u["name"], u["iters"]) for u in r2["units"]] == [(u["name"], u["iters"]) for u in r1["units"]]
    budget = r2["config"]["method"]["step_budget"]
    assert sum(u["iters"] for u in r2["units"]) == round(budget * 10 * len(r2["units"]))
    assert sum("+" in u["name"] for u in r2["units"]) == 1
    assert abs(r2["quant_top1"] - r1["quant_top1"]) < 3.0, (r1["quant_top1"], r2["quant_top1"])


def test_only_rank_zero_writes(runs):
    one, two = runs
    assert files_of(two) == files_of(one)  # no per-rank Hydra dirs, logs, states or temporaries
    log_lines = (two / "run.log").read_text()
    assert "DDP: 2 processes (gloo), rank 0" in log_lines and "rank 1" not in log_lines

    def logged(run_dir):
        header, *rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
        return header, [r.split(",")[header.split(",").index("step")] for r in rows]

    assert logged(two) == logged(one)  # one writer: the same keys and rows as one process
    assert "u01_layer1.0/lr_weight_scale" in logged(two)[0]  # the weight scales are learned (rank_state_sha256: alike)


def test_kill_then_resume_under_ddp_matches_uninterrupted(runs, tmp_path):
    _, two = runs
    killed = tmp_path / "killed"
    kill_after_unit(killed, *RUN, OMP_NUM_THREADS="1")  # both ranks
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    done = len(torch.load(killed / STATE_FILE, weights_only=False)["units"])
    assert done == 4  # units 0..3: the kill came at the boundary the run reported
    resumed = run_cli(*RUN, "resume=auto", f"hydra.run.dir={killed}", OMP_NUM_THREADS="1")  # its own dir
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, res = (json.loads((d / "results.json").read_text()) for d in (two, killed))
    assert res["quant_top1"] == ref["quant_top1"] and res["rank_state_sha256"] == ref["rank_state_sha256"]
    a, b = (torch.load(d / "quantized_model.pt") for d in (two, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_ddp_settings_stop_with_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(PdqError, match=r"trainer.devices=2 .*strategy='auto'.*accepted: ddp"):
        world_size_of({"accelerator": "cpu", "devices": 2, "strategy": "auto", "num_nodes": 1})
    with pytest.raises(PdqError, match=r"trainer.devices='two' is not accepted"):
        world_size_of({"accelerator": "cpu", "devices": "two", "strategy": "ddp", "num_nodes": 1})
    with pytest.raises(PdqError, match=r"calib.size=63 does not split evenly over 2 processes"):
        run(make_cfg("trainer=ddp_cpu", "calib.size=63", "calib.act_init_size=32"))
    with pytest.raises(PdqError, match=r"calib.batch_size=33 does not split evenly over 2 processes"):
        run(make_cfg("trainer=ddp_cpu", "calib.batch_size=33"))
    with pytest.raises(PdqError, match=r"starts its ranks through the `pdq` command"):
        run(make_cfg("trainer=ddp_cpu", "method=rtn_minmax", "debug=fast"))
    assert "LOCAL_RANK" not in os.environ  # the refused run left this process as it was
    proc = run_cli("trainer=ddp_cpu", "trainer.num_nodes=2", "debug=fast", "method=rtn_minmax", "logger=none",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "trainer.num_nodes=2 needs its processes started" in proc.stderr


FAULTS = ROOT / "tests" / "faults"  # sitecustomize.py (makes rank 1 exit with code 3) and status_logger.py


def run_with_failing_rank(*args: str, when: str, timeout: int):
    """`python run.py ARGS` whose rank 1 exits with code 3 `when` (see tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return run_cli(*args, timeout=timeout, PYTHONPATH=path, PDQ_TEST_RANK_EXIT=when, OMP_NUM_THREADS="1")


def test_a_rank_that_fails_mid_run_ends_the_run_with_one_clear_error_and_the_logger_finished(tmp_path):
    """Rank 1 dies while rank 0 reconstructs the next unit: rank 0 stops its work (it would wait for rank 1 in a
    collective) and ends as any failed run does: a PdqError naming rank 1 and its exit code (stderr and run.log),
    the logger finished by pdq as failed, the saved state kept for a resume, and no results."""
    run_dir = tmp_path / "run"
    proc = run_with_failing_rank(*RUN, "logger._target_=status_logger.StatusLogger", f"hydra.run.dir={run_dir}",
                                 when=str(run_dir / STATE_FILE), timeout=400)
    message = "rank 1 exited with code 3; the run was stopped on every rank"
    assert proc.returncode == 2 and f"pdq: error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert message in (run_dir / "run.log").read_text()
    status, caller = (run_dir / "finalized.txt").read_text().splitlines()[-1].split()
    assert status == "failed" and caller.startswith("pdq."), (status, caller)  # pdq's finish, not only a fit's
    assert (run_dir / STATE_FILE).is_file() and not (run_dir / "results.json").exists()


def test_a_rank_that_fails_before_joining_ends_the_run_at_once(tmp_path):
    """Rank 1 dies before it joins the process group: rank 0 stops waiting for it (no 30-minute rendezvous timeout)."""
    proc = run_with_failing_rank("trainer=ddp_cpu", "debug=fast", "method=rtn_minmax", "calib.size=64",
                                 "calib.act_init_size=64", "logger=none", f"hydra.run.dir={tmp_path}",
                                 when="start", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pdq: error: rank 1 exited with code 3; the run was stopped on every rank" in proc.stderr


#: a rank 1 that joins rank 0's group, then dies with exit code 3
FAILING_RANK = """
import os, time
from omegaconf import OmegaConf
from pdq.launch import session
with session(OmegaConf.create({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_nodes": 1}), None):
    time.sleep(1)
    os._exit(3)
"""


def test_a_failed_rank_interrupts_rank_zero_outside_any_collective(monkeypatch, tmp_path):
    """Rank 0 waits in no collective (a sleep here, any long computation in a run): the watcher's signal ends its
    wait at once, and the session ends with the error naming the rank, having put back what it changed: the
    environment, the thread count and the signal handler."""
    import signal
    import sys
    import time

    from pdq import launch

    monkeypatch.setattr(launch, "child_command", lambda out_dir: [sys.executable, "-c", FAILING_RANK])
    env, threads, handler = dict(os.environ), torch.get_num_threads(), signal.getsignal(launch.INTERRUPT)
    t0 = time.monotonic()
    with pytest.raises(PdqError, match=r"^rank 1 exited with code 3; the run was stopped on every rank"):
        trainer = OmegaConf.create({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "num_nodes": 1})
        with launch.session(trainer, tmp_path) as dist:
            assert dist.world_size == 2 and dist.rank == 0
            time.sleep(120)
    assert time.monotonic() - t0 < 60
    assert not tdist.is_initialized()
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    assert signal.getsignal(launch.INTERRUPT) == handler


def _ranks(rank, world, init_file, x, cfg, out):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        dist = Dist(rank=rank, world_size=world)
        local = x[dist.shard(len(x))]
        twin, bns = _unit()
        corrected, info = correct(twin, bns, local, cfg, dist=dist)
        out[rank] = (corrected, info, dist.head(local, 40), dist.sum(float(rank), 1.0))
    finally:
        tdist.destroy_process_group()


def _unit():
    torch.manual_seed(0)
    unit = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    bn = unit[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return unit.eval(), [bn]


@pytest.mark.parametrize("chunk", [64, 16])
def test_dc_and_gathering_over_two_ranks_equal_one_process(tmp_path, chunk):
    """DC of each rank's shard (one chunk over the whole set: lockstep on the summed loss; or chunks
    that divide the shard) gives the one-process correction; `head` gathers the first rows of the set."""
    x = torch.randn(64, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    cfg = make_dc(steps=40, lr=1e-2, chunk=chunk, patience=5)
    twin, bns = _unit()
    ref, ref_info = correct(twin, bns, x, cfg)
    out = mp.Manager().dict()
    mp.spawn(_ranks, args=(2, tmp_path / "store", x, cfg, out), nprocs=2, join=True)
    corrected = torch.cat([out[0][0], out[1][0]])
    assert torch.allclose(corrected, ref, atol=1e-5, rtol=1e-4) and not torch.equal(corrected, x)
    for r in (0, 1):
        assert out[r][1]["dc_loss_after"] == pytest.approx(ref_info["dc_loss_after"], rel=1e-4)
        assert out[r][1]["dc_loss_before"] == pytest.approx(ref_info["dc_loss_before"], rel=1e-5)
        assert torch.equal(out[r][2], x[:40]) and out[r][3] == [1.0, 2.0]


def test_dc_chunk_that_splits_a_shard_is_refused(tmp_path):
    cfg = make_dc(steps=2, chunk=24)
    twin, bns = _unit()
    with pytest.raises(PdqError, match=r"method.dc.chunk=24 .* 32 calibration images of each of the 2 processes"):
        correct(twin, bns, torch.randn(32, 4, 5, 5), cfg, dist=Dist(rank=0, world_size=2))
    assert SINGLE.head(torch.arange(5), 3).tolist() == [0, 1, 2] and SINGLE.sum(2.0) == [2.0]


def test_sequential_multirun_starts_ranks_for_every_job(tmp_path):
    """Hydra's basic launcher runs the jobs one after the other in one process: each job starts and ends
    its own ranks (the first job's rank-0 environment must not make the second wait for absent ranks)."""
    proc = run_cli("-m", "trainer=ddp_cpu", "method=rtn_minmax,rtn_mse", "debug=fast", "calib.size=64",
                   "calib.act_init_size=64", "logger=none", f"hydra.sweep.dir={tmp_path}", timeout=300,
                   OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 2
    for r in results:
        res = json.loads(r.read_text())
        assert res["world_size"] == 2 and len(set(res["rank_state_sha256"])) == 1


@pytest.mark.parametrize("orig,argv,launch", [
    (["python3", "/repo/run.py", "seed=1"], ["/repo/run.py", "seed=1"], ["/repo/run.py"]),
    (["python3", "-X", "utf8", "-m", "my_pkg.cli", "seed=1", "quant=w2a2"],
     ["/site-packages/my_pkg/cli.py", "seed=1", "quant=w2a2"], ["-X", "utf8", "-m", "my_pkg.cli"]),
    (["/usr/bin/python3", "/venv/bin/my-quantize", "seed=1"], ["/venv/bin/my-quantize", "seed=1"],
     ["/venv/bin/my-quantize"]),
], ids=["checkout", "module", "installed_script"])
def test_ranks_are_started_as_this_process_was(monkeypatch, tmp_path, orig, argv, launch):
    """Self-spawned ranks rerun what the user ran (a checkout's run.py, `python -m`, an installed script),
    not a run.py next to the package, which a pip-installed pdq does not have."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from pdq.launch import child_command

    monkeypatch.setattr(sys, "orig_argv", orig)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: OmegaConf.create(
        {"overrides": {"task": ["seed=1", "trainer=ddp_cpu"]}})))
    command = child_command(tmp_path)
    assert command[:len(launch) + 1] == [sys.executable, *launch]
    assert command[len(launch) + 1:len(launch) + 3] == ["seed=1", "trainer=ddp_cpu"]
    assert f"hydra.run.dir={tmp_path}" in command
