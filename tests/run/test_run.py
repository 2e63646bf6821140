"""End to end: `python run.py` writes a valid results.json; W8A8 RTN stays near FP; determinism;
every bad value of the contract's error list stops the run with one clear message and a non-zero exit."""

import json
import logging

import pytest
import torch
from hydra.errors import HydraException

from pdq.errors import PdqError
from pdq.pipeline import run
from tests.conftest import glibc, run_cli

RESULT_KEYS = {"model", "dataset", "method", "w_bits", "a_bits", "seed", "calib_size", "iters", "fp_top1",
               "quant_top1", "wall_s", "versions", "units"}


def test_cli_small_run_writes_results(tmp_path):
    proc = run_cli("debug=fast", "method=rtn_minmax", "quant=w4a4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= res.keys()
    assert (res["model"], res["dataset"], res["method"]) == ("resnet20_fmnist", "fashion_mnist", "rtn_minmax")
    assert (res["w_bits"], res["a_bits"], res["seed"], res["calib_size"], res["iters"]) == (4, 4, 1005, 256, 0)
    assert res["fp_top1"] > 85 and 10 < res["quant_top1"] <= 100
    assert set(res["versions"]) == {"pdq", "torch", "torchvision", "lightning"}
    assert res["units"] == []
    assert res["components"] == {"pd": False, "reg": False, "dc": False}
    assert (tmp_path / "csv" / "metrics.csv").exists() and (tmp_path / "quantized_model.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    if glibc():  # elsewhere there is no mallopt to set, and the line says False
        assert "freed memory kept for reuse (keep_freed_memory=true): True" in proc.stdout + proc.stderr


def test_cli_default_is_pdquant_and_logs_pd_terms(tmp_path):
    """`python run.py` (PD-Quant W4A4 on resnet20_fmnist) with a tiny iteration count: every reconstructed
    unit reports its PD, reconstruction and rounding losses, and the BN units their DC loss before/after."""
    proc = run_cli("debug=fast", "method.iters=3", "method.dc.steps=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (res["method"], res["w_bits"], res["a_bits"], res["iters"]) == ("pdquant", 4, 4, 3)
    assert len(res["units"]) == 11  # stem, 9 residual blocks, classifier
    for unit in res["units"]:
        assert {"pd_loss", "rec_loss", "round_loss"} <= unit.keys() and unit["iters"] == 3
    *bn_units, head = res["units"]  # DC corrects every unit with BatchNorms; the classifier has none
    assert all(u["dc_loss_after"] < u["dc_loss_before"] for u in bn_units) and "dc_loss_before" not in head
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    for key in ("pd_loss", "rec_loss", "round_loss", "dc_loss_before", "dc_loss_after"):
        assert f"u01_layer1.0/{key}" in header


def test_fp_accuracy_is_cached_per_weights_and_data(make_cfg, tmp_path, caplog):
    from pdq.evaluate import fp_top1
    from pdq.models import build_model

    cfg = make_cfg("data.eval_subset=300")
    dm = instantiate_data(cfg)
    model = build_model("resnet20_fmnist")
    first = fp_top1(model, dm.test_dataloader(), torch.device("cpu"), **cached(cfg))
    files = list((tmp_path / "cache" / "fp_top1").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["fp_top1"] == first
    json_text = files[0].read_text().replace(str(first), "12.5")  # a cache hit returns the stored figure
    files[0].write_text(json_text)
    assert fp_top1(model, dm.test_dataloader(), torch.device("cpu"), **cached(cfg)) == 12.5
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # other weights: another entry
    assert fp_top1(model, dm.test_dataloader(), torch.device("cpu"), **cached(cfg)) != 12.5
    assert len(list((tmp_path / "cache" / "fp_top1").glob("*.json"))) == 2
    other = make_cfg("data.eval_subset=200")  # other data config: another entry
    fp_top1(model, instantiate_data(other).test_dataloader(), torch.device("cpu"), **cached(other))
    assert len(list((tmp_path / "cache" / "fp_top1").glob("*.json"))) == 3


def cached(cfg) -> dict:
    """fp_top1's cache arguments, as the pipeline passes them."""
    from omegaconf import OmegaConf

    return {"cache_dir": cfg.paths.cache_dir, "model_name": cfg.model.name,
            "data": OmegaConf.to_container(cfg.data, resolve=True)}


def instantiate_data(cfg):
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.parametrize("model", ["resnet20_fmnist", "mobilenetv2_fmnist"])
def test_w8a8_rtn_within_one_point_of_fp(make_cfg, model):
    res = run(make_cfg(f"model={model}", "method=rtn_minmax", "quant=w8a8", "calib.size=256",
                       "data.eval_subset=2000", "logger=none"))
    assert res["fp_top1"] - res["quant_top1"] <= 1.0, res


def test_same_seed_same_result(make_cfg, tmp_path):
    overrides = ["method=rtn_mse", "quant=w3a3", "calib.size=128", "calib.act_init_size=64",
                 "data.eval_subset=500", "logger=none"]
    a = run(make_cfg(*overrides, f"paths.output_dir={tmp_path / 'a'}"))
    b = run(make_cfg(*overrides, f"paths.output_dir={tmp_path / 'b'}"))
    run(make_cfg(*overrides, "seed=7", f"paths.output_dir={tmp_path / 'c'}"))
    sa, sb, sc = (torch.load(tmp_path / d / "quantized_model.pt") for d in "abc")
    assert a["quant_top1"] == b["quant_top1"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # another seed draws other calibration images


@pytest.fixture(scope="module")
def corrupt_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "broken.pt"
    path.write_bytes(b"\x80\x04 definitely not a checkpoint")
    return path


BAD_VALUES = [
    (["model=nope"], "Could not find 'model/nope'", "resnet20_fmnist"),
    (["method=nope"], "Could not find 'method/nope'", "rtn_mse"),
    (["quant=w9a9"], "Could not find 'quant/w9a9'", "w4a4"),
    (["quant.w_bits=9"], "quant.w_bits=9 is not supported", "accepted: an integer 2..8, or 32"),
    (["quant.a_bits=1"], "quant.a_bits=1 is not supported", "accepted: an integer 2..8, or 32"),
    (["quant.layout=tflite"], "quant.layout='tflite' is unknown", "accepted: pdquant, brecq"),
    (["data=imagenet", "data.root=/nonexistent/imagenet"], "data.root='/nonexistent/imagenet' has no 'train/'",
     "train/ and val/"),
    (["calib.size=100000"], "calib.size=100000 is larger than the training split", "accepted: 1..60000"),
    (["calib.size=0"], "calib.size=0 is not accepted", "a positive integer"),
    (["model.checkpoint=/nonexistent.pt"], "model.checkpoint='/nonexistent.pt' does not exist", "accepted"),
    (["model.checkpoint={corrupt}"], "is corrupt or not a PyTorch checkpoint", "broken.pt"),
    (["model=resnet18"], "model=resnet18 needs trained weights", "model.checkpoint=PATH"),
    (["method=rtn_mse", "++method.iters=2"], "iters=2 is not a setting of rtn_mse",
     "accepted: name, weight_observer, act_observer"),
]


@pytest.mark.parametrize("overrides,message,accepted", BAD_VALUES, ids=[" ".join(b[0]) for b in BAD_VALUES])
def test_bad_values_fail_fast_with_clear_message(overrides, message, accepted, corrupt_ckpt, make_cfg, tmp_path,
                                                 caplog):
    args = [o.format(corrupt=corrupt_ckpt) for o in overrides]
    with pytest.raises((PdqError, HydraException)) as error, caplog.at_level(logging.INFO, logger="pdq"):
        run(make_cfg(*args))
    assert message in str(error.value) and accepted in str(error.value)
    assert not (tmp_path / "results.json").exists()
    assert "FP top-1" not in caplog.text  # stopped before any evaluation


@pytest.mark.parametrize("overrides", [["model=nope"], ["quant.w_bits=9"]])
def test_a_bad_value_on_the_command_line_ends_with_its_message_and_no_traceback(overrides, tmp_path):
    """The command line's side of the cases above: Hydra's own error for an unknown option, pdq's for a value."""
    message, accepted = next((m, a) for o, m, a in BAD_VALUES if o == overrides)
    proc = run_cli(*overrides, f"hydra.run.dir={tmp_path}", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out and accepted in out, out[-3000:]
    assert "Traceback" not in out and "FP top-1" not in out
    assert not (tmp_path / "results.json").exists()


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    proc = run_cli("-m", "launcher=joblib", "hydra.launcher.n_jobs=2", "method=rtn_minmax,rtn_mse", "calib.size=64",
                   "calib.act_init_size=32", "data.eval_subset=200", "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(tmp_path.glob("*/results.json"))
    assert [json.loads(p.read_text())["method"] for p in jobs] == ["rtn_minmax", "rtn_mse"]
    assert "Joblib" in (tmp_path / "multirun.yaml").read_text()


def test_named_sweep_runs_without_m_and_a_second_run_skips_finished_jobs(tmp_path):
    """`run.py sweep=embedded` is a multirun; command-line values replace the swept ones; run again, its
    finished jobs are skipped (resume=auto), so an interrupted sweep is continued by the same command."""
    args = ["sweep=embedded", "experiment=embedded/resnet20_fmnist_w4a4", "method=rtn_minmax", "seed=1,2",
            "calib.act_init_size=32", "data.eval_subset=200", "logger=none", f"hydra.sweep.dir={tmp_path}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = sorted(tmp_path.glob("*/results.json"))
    res = [json.loads(p.read_text()) for p in jobs]
    assert [(r["method"], r["seed"], r["calib_size"], r["w_bits"], r["a_bits"]) for r in res] == \
        [("rtn_minmax", 1, 256, 4, 4), ("rtn_minmax", 2, 256, 4, 4)]
    stamps = [(p.read_bytes(), p.stat().st_mtime_ns) for p in jobs]
    (jobs[1]).unlink()  # as if the sweep had been stopped before its second job finished
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    out = second.stdout + second.stderr
    assert out.count("nothing to do") == 1 and "FP top-1" in out
    assert (jobs[0].read_bytes(), jobs[0].stat().st_mtime_ns) == stamps[0]
    assert json.loads(jobs[1].read_text())["quant_top1"] == res[1]["quant_top1"]
