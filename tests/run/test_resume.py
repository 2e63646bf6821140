"""Resuming a run (`resume=<run dir>`, `resume=auto`): kill-then-resume equality, its records (log, CSV,
wall time) in the run's own dir, refusals naming the differing keys, corrupt saved states, finished runs."""

import json
import shlex

import pytest
import torch
from omegaconf import OmegaConf

from pdq.errors import PdqError
from pdq.pipeline import run
from pdq.resume import (
    EARLIER_METRICS,
    STATE_FILE,
    WALL_FILE,
    begin_part,
    fingerprint,
    load_resume_state,
    settings_diff,
)
from tests.conftest import interrupt_at, kill_after_unit, run_cli
from tests.run.test_validation import no_heavy_work  # noqa: F401  (fixture)

SHORT = ["model=resnet20_fmnist", "calib.size=128", "calib.act_init_size=64", "data.eval_subset=1000",
         "logger=none"]


def state_of(path):
    return torch.load(path / "quantized_model.pt")


@pytest.mark.parametrize("policy", [[], ["method.steps=adaptive", "method.step_budget=0.5", "method.unit_merges=2"]],
                         ids=["uniform", "adaptive"])
def test_kill_after_unit_k_then_resume_matches_uninterrupted(make_cfg, tmp_path, policy):
    """Resumed from the command line in a new Hydra dir: the same result as an uninterrupted run, and every
    record (log file, CSV rows of both parts, wall time of both parts) in the interrupted run's dir. Adaptive
    steps and merged units: the resumed part fits with the saved step plan."""
    args = [*SHORT, "method=qdrop", "method.iters=60", "quant=w2a4", *policy]
    ref = run(make_cfg(*args, f"paths.output_dir={tmp_path / 'ref'}"))
    killed = tmp_path / "killed"
    threads = str(torch.get_num_threads())  # CPU results are bit-identical only for the same thread count
    kill_after_unit(killed, *args, "logger=csv", OMP_NUM_THREADS=threads)
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    done = len(torch.load(killed / STATE_FILE, weights_only=False)["units"])
    assert done == 4  # units 0..3: the kill came at the boundary the run reported
    first_part = (killed / STATE_FILE).stat().st_mtime - json.loads((killed / WALL_FILE).read_text())["started"]
    first_rows = (killed / "csv" / "metrics.csv").read_text().splitlines()[1:]
    other = tmp_path / "other"
    proc = run_cli(*args, "logger=csv", f"resume={killed}", f"hydra.run.dir={other}", OMP_NUM_THREADS=threads)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["quant_top1"] == ref["quant_top1"]
    assert [(u["name"], u["iters"]) for u in resumed["units"]] == [(u["name"], u["iters"]) for u in ref["units"]]
    s_ref, s_res = state_of(tmp_path / "ref"), state_of(killed)
    assert all(torch.equal(s_ref[k], s_res[k]) for k in s_ref)
    # wall_s is the sum of the recorded parts: the first up to its last saved unit, the second up to results.json
    parts = json.loads((killed / WALL_FILE).read_text())
    assert first_part > 0 and parts["before_s"] == pytest.approx(first_part, abs=1e-3)
    second_part = resumed["wall_s"] - parts["before_s"]
    assert 0 < second_part <= (killed / "results.json").stat().st_mtime - parts["started"] + 0.01
    assert resumed["config"]["paths"]["output_dir"] == str(killed)
    assert "resuming" in (killed / "run.log").read_text()  # the log of both parts in the run's dir
    rows = (killed / "csv" / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) > len(first_rows) > 0 and not (killed / "csv" / EARLIER_METRICS).exists()
    assert not (other / "csv").exists() and not (other / "results.json").exists()


def test_ctrl_c_during_a_units_fit_is_one_line_naming_what_to_resume_and_exits_130(make_cfg, tmp_path):
    """SIGINT inside a unit's Lightning fit (under way: its first loss terms are in the CSV log, written at every
    logging step): one line naming the saved state and the command that resumes it, no traceback, exit status
    130; the printed command resumes it."""
    run_dir = tmp_path / "run"
    args = [*SHORT[:-1], "method=qdrop", "method.iters=1000", "quant=w2a4", "logger=csv",
            "++logger.flush_logs_every_n_steps=1", "paths.cache_dir=null"]
    metrics = run_dir / "csv" / "metrics.csv"
    proc = interrupt_at(run_dir, *args, line=r"saved recon_state.pt after phase 0 unit 0 ",
                        ready=lambda: metrics.is_file() and "u01_" in metrics.read_text().partition("\n")[0])
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    command = f"pdq {shlex.join(args)} resume={run_dir}"
    assert [line for line in proc.stderr.splitlines() if "interrupted" in line] == [
        f"pdq: interrupted: saved {STATE_FILE} after phase 0 unit 0 in {run_dir}; resume with `{command}`"]
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert (state["phase"], state["index"], len(state["units"])) == (0, 0, 1)
    assert not (run_dir / "results.json").exists()
    resumed_dir, resumed = load_resume_state(make_cfg(*shlex.split(command)[1:]))  # the same settings: it resumes
    assert resumed_dir == run_dir and len(resumed["units"]) == 1


def test_ctrl_c_during_the_sensitivity_measurement_is_one_line_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    args = [o.replace("calib.size=128", "calib.size=512") for o in SHORT]  # a measurement of several seconds
    proc = interrupt_at(run_dir, *args, "quant=mixed", "quant.budget.avg_w_bits=3", "method=qdrop",
                        "paths.cache_dir=null", line=r"sensitivity: measuring")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if "interrupted" in line] == [
        "pdq: interrupted before any unit finished; nothing to resume"]
    assert not (run_dir / STATE_FILE).exists() and not (run_dir / "results.json").exists()


def test_resume_refuses_other_settings_naming_the_keys(make_cfg, tmp_path):
    args = [*SHORT, "method=qdrop", "method.iters=2", "quant=w4a4"]
    run(make_cfg(*args, f"paths.output_dir={tmp_path / 'a'}"))
    (tmp_path / "a" / "results.json").rename(tmp_path / "a" / "results.bak")  # as if interrupted at the end
    with pytest.raises(PdqError, match=r"other settings \(quant.a_bits: 4 \(saved\) vs 2 \(now\); quant.w_bits: 4 "
                                       r"\(saved\) vs 2 \(now\)\)"):
        run(make_cfg(*SHORT, "method=qdrop", "method.iters=2", "quant=w2a2", f"resume={tmp_path / 'a'}"))
    (tmp_path / "a" / "results.bak").rename(tmp_path / "a" / "results.json")
    # a finished dir, by resume=auto or resume=<dir>: the same settings do nothing, other settings are refused
    results = tmp_path / "a" / "results.json"
    stamp = (results.read_bytes(), results.stat().st_mtime_ns)
    again = run(make_cfg(*args, "resume=auto", f"paths.output_dir={tmp_path / 'a'}"))
    assert again == json.loads(stamp[0]) and (results.read_bytes(), results.stat().st_mtime_ns) == stamp
    again = run(make_cfg(*args, f"resume={tmp_path / 'a'}", f"paths.output_dir={tmp_path / 'x'}"))
    assert again == json.loads(stamp[0]) and (results.read_bytes(), results.stat().st_mtime_ns) == stamp
    for resume in ("resume=auto", f"resume={tmp_path / 'a'}"):
        with pytest.raises(PdqError, match=r"results.json holds the results of other settings "
                                           r"\(method.iters: 2 \(saved\) vs 3 \(now\)"):
            run(make_cfg(*SHORT, "method=qdrop", "method.iters=3", "quant=w4a4", resume,
                         f"paths.output_dir={tmp_path / 'a'}"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text('{"quant_top1": 5')  # edited by hand, cut short
    with pytest.raises(PdqError, match=r"resume=auto: .*results.json is not valid JSON .*remove it"):
        run(make_cfg(*args, "resume=auto", f"paths.output_dir={tmp_path / 'c'}"))
    # and in a fresh dir it is a plain run
    fresh = run(make_cfg(*args, "resume=auto", f"paths.output_dir={tmp_path / 'b'}"))
    assert fresh["quant_top1"] == again["quant_top1"] and (tmp_path / "b" / "results.json").is_file()


def fake_state(cfg, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"phase": 0, "index": 0, "units": [], "state_dict": {"w": torch.zeros(64)},
                "fingerprint": fingerprint(cfg)}, run_dir / STATE_FILE)
    return run_dir / STATE_FILE


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
@pytest.mark.parametrize("mode", ["dir", "auto"])
def test_corrupt_saved_state_is_one_clear_error(make_cfg, no_heavy_work, tmp_path, damage, mode):  # noqa: F811
    run_dir = tmp_path / "run"
    state = fake_state(make_cfg(*SHORT, "method=qdrop"), run_dir)
    data = state.read_bytes()
    state.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                       "random": bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist())}[damage])
    resume = "resume=auto" if mode == "auto" else f"resume={run_dir}"
    with pytest.raises(PdqError, match=r"recon_state.pt is truncated or corrupt .*remove it to start this run afresh"):
        run(make_cfg(*SHORT, "method=qdrop", resume, f"paths.output_dir={run_dir}"))


def test_resume_with_another_process_count_is_refused(make_cfg, no_heavy_work, tmp_path):  # noqa: F811
    one = make_cfg(*SHORT, "method=qdrop")
    two = make_cfg(*SHORT, "method=qdrop", "trainer=ddp_cpu", "trainer.devices=2")
    assert "trainer.devices: 1 (saved) vs 2 (now)" in settings_diff(fingerprint(one), two)
    fake_state(one, tmp_path / "run")
    with pytest.raises(PdqError, match=r"other settings \(.*trainer.devices: 1 \(saved\) vs 2 \(now\)"):
        run(make_cfg(*SHORT, "method=qdrop", "trainer=ddp_cpu", "trainer.devices=2", f"resume={tmp_path / 'run'}"))


def test_settings_diff_names_keys_with_both_values(make_cfg):
    saved = fingerprint(make_cfg("method=qdrop", "method.iters=100"))
    assert settings_diff(saved, make_cfg("method=qdrop", "method.iters=100")) == []
    assert settings_diff(saved, make_cfg("method=qdrop", "method.iters=200"))[0] == \
        "method.iters: 100 (saved) vs 200 (now)"
    assert settings_diff({k: v for k, v in saved.items() if k != "trainer"}, make_cfg("method=qdrop",
                                                                                     "method.iters=100")) == \
        [f"trainer: not recorded (saved) vs {json.dumps(saved['trainer'])} (now)"]


def test_runs_saved_before_conf_trainer_set_its_process_layout_still_match(make_cfg):
    """A fingerprint or results.json from before conf/trainer/_base.yaml set strategy, num_nodes and
    log_every_n_steps ran with Lightning's defaults for them; the log cadence changes no result."""
    cfg = make_cfg("method=qdrop")
    saved = fingerprint(cfg)
    for key in ("strategy", "num_nodes", "log_every_n_steps"):
        del saved["trainer"][key]
    assert settings_diff(saved, cfg) == []
    assert settings_diff(fingerprint(cfg), make_cfg("method=qdrop", "trainer.log_every_n_steps=5")) == []
    assert "trainer.strategy: auto (saved) vs ddp (now)" in settings_diff(saved, make_cfg("method=qdrop",
                                                                                           "trainer=ddp_cpu"))


@pytest.mark.parametrize("method", ["qdrop", "rtn_mse"])
def test_runs_saved_before_learned_weight_scales_step_policies_and_merges_existed_still_match(make_cfg, method):
    """Fingerprints from before `method.learn_weight_scale`, `method.steps` and `method.unit_merges`: the scales
    were not learned (their lr and optimiser did not matter), every unit had `iters` steps (the adaptive budget
    did not matter) and no units were merged; a run that turns one on now differs (a method without the keys has
    nothing to add)."""
    cfg = make_cfg(f"method={method}")
    saved = fingerprint(cfg)
    for key in ("learn_weight_scale", "weight_scale_lr", "weight_scale_optimizer", "steps", "step_budget",
                "step_bounds", "unit_merges"):
        saved["method"].pop(key, None)
    assert settings_diff(saved, cfg) == []
    if method == "qdrop":
        for key, now, line in (("learn_weight_scale", "true", "false (saved) vs true (now)"),
                               ("steps", "adaptive", "uniform (saved) vs adaptive (now)"),
                               ("step_budget", "0.5", "1.0 (saved) vs 0.5 (now)"),
                               ("unit_merges", "2", "0 (saved) vs 2 (now)")):
            assert settings_diff(saved, make_cfg("method=qdrop", f"method.{key}={now}")) == [f"method.{key}: {line}"]
        assert settings_diff(saved, make_cfg("method=qdrop", "method.iters=7")) != []


def test_resume_of_a_finished_run_dir_does_nothing(make_cfg, no_heavy_work, tmp_path):  # noqa: F811
    cfg = make_cfg(*SHORT, "method=qdrop")
    done = tmp_path / "done"
    fake_state(cfg, done)
    results = {"quant_top1": 42.0, "wall_s": 34.0, "config": OmegaConf.to_container(cfg, resolve=True)}
    (done / "results.json").write_text(json.dumps(results))
    stamp = ((done / "results.json").read_bytes(), (done / "results.json").stat().st_mtime_ns)
    assert run(make_cfg(*SHORT, "method=qdrop", f"resume={done}", f"paths.output_dir={tmp_path / 'new'}")) == results
    assert ((done / "results.json").read_bytes(), (done / "results.json").stat().st_mtime_ns) == stamp


def test_wall_time_sums_the_parts(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"state")
    import os

    os.utime(tmp_path / STATE_FILE, (1030.0, 1030.0))  # the first part saved its last unit 30 s after its start
    (tmp_path / WALL_FILE).write_text(json.dumps({"before_s": 10.0, "started": 1000.0}))
    assert begin_part(tmp_path, resumed=True, t0=5000.0) == 40.0
    assert json.loads((tmp_path / WALL_FILE).read_text()) == {"before_s": 40.0, "started": 5000.0}
    assert begin_part(tmp_path, resumed=False, t0=6000.0) == 0.0  # a fresh run starts at zero
