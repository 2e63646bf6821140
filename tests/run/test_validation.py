"""Bad input that used to get through (issue 12): each ends in one PdqError naming the value and what is
accepted, before any heavy work (data loading, FP evaluation, quantization); a crash or a logger failure
never loses or corrupts an artifact; a run leaves its process's global state as it found it."""

import gzip
import json
import logging
import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pdq.data import FashionMNISTDataModule, ImageNetDataModule
from pdq.data import fashion_mnist as fm
from pdq.errors import PdqError
from pdq.pipeline import run
from tests.conftest import run_cli

SMALL = ["method=rtn_minmax", "calib.size=64", "calib.act_init_size=32", "data.eval_subset=200", "logger=none"]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading the data or evaluating anything fails the test: the error must come before."""
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was refused")

    for cls in (FashionMNISTDataModule, ImageNetDataModule):
        monkeypatch.setattr(cls, "setup", heavy)
    monkeypatch.setattr("pdq.pipeline.evaluate", heavy)
    monkeypatch.setattr("pdq.pipeline.quantize_and_evaluate", heavy)


def fails(make_cfg, *overrides, match):
    with pytest.raises(PdqError, match=match):
        run(make_cfg(*overrides))


@pytest.mark.parametrize("value,accepted", [("-5", "1..10000"), ("0", "1..10000"), ("20000", "1..10000")])
def test_eval_subset_outside_the_test_split(make_cfg, no_heavy_work, value, accepted):
    fails(make_cfg, f"data.eval_subset={value}",
          match=rf"data.eval_subset={value} is not accepted; accepted: null \(the whole test split\) or {accepted}")


@pytest.mark.parametrize("key,value", [("batch_size", 64), ("act_init_size", 500)])
def test_calib_batch_or_act_init_larger_than_calib_size(make_cfg, no_heavy_work, key, value):
    fails(make_cfg, "calib.size=32", f"calib.{key}={value}",
          match=rf"calib.{key}={value} is larger than calib.size=32 .*accepted: 1..32")


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), "1.5"])
def test_seed_outside_0_to_2_pow_32(make_cfg, no_heavy_work, seed):
    fails(make_cfg, f"seed={seed}", match=rf"seed={seed} is not accepted; accepted: an integer in \[0, 4294967295\]")


@pytest.mark.parametrize("override,key", [
    ("calib.size=nan", "calib.size"),
    ("data.eval_batch_size=nan", "data.eval_batch_size"),
    ("data.eval_subset=inf", "data.eval_subset"),
    ("++trainer.gradient_clip_val=nan", "trainer.gradient_clip_val"),
    ("++trainer.gradient_clip_val=-inf", "trainer.gradient_clip_val"),
])
def test_nan_and_inf_are_refused(make_cfg, no_heavy_work, override, key):
    fails(make_cfg, override, match=rf"{key}=.*is not accepted; accepted: a (finite number|positive integer)")


def test_empty_checkpoint(make_cfg, no_heavy_work, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    fails(make_cfg, f"model.checkpoint={empty}", match=r"model.checkpoint='.*empty.pt' is an empty file .*accepted")


def test_non_finite_weights_are_refused_naming_the_tensor(make_cfg, no_heavy_work, tmp_path):
    from pdq.models.fmnist import resnet20_fmnist

    state = resnet20_fmnist().state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.weight"][0, 0] = float("inf")  # a later tensor: the first bad one is named
    torch.save(state, tmp_path / "nan.pt")
    fails(make_cfg, f"model.checkpoint={tmp_path / 'nan.pt'}",
          match=r"holds non-finite weights: tensor 'layer2.0.conv1.weight' has 1 NaN/inf values .*accepted: finite")


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def tiny_fmnist(root, train=8, test=4):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_truncated_gz_data_names_the_file(make_cfg, tmp_path):
    root = tiny_fmnist(tmp_path / "fmnist")
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-40])  # a download cut short
    with pytest.raises(PdqError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        FashionMNISTDataModule(root=str(root), download=False).setup()
    with pytest.raises(PdqError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        run(make_cfg(f"data.root={root}", "data.download=false", "calib.size=8", "calib.batch_size=8",
                     "calib.act_init_size=8", "method=rtn_minmax", "logger=none"))


@pytest.mark.parametrize("value,shown", [("5", "5"), ("[1,2]", r"\[1, 2\]")])
def test_model_kwargs_that_is_not_a_mapping(make_cfg, no_heavy_work, value, shown):
    fails(make_cfg, "model=custom", "model.target=torch.nn.Linear", f"model.kwargs={value}",
          match=rf"model.kwargs={shown} is not accepted; accepted: a mapping of keyword arguments, e.g. "
                r"model.kwargs=\{num_classes:10\}")


def write_images(folder, n, size=28, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")


#: data=folder for the embedded ResNet-20 (10 outputs, one 28x28 channel), with 4 calibration images
FOLDER = ["data=folder", "data.image_size=28", "data.channels=1", "data.mean=[0.286]", "data.std=[0.353]",
          "calib.size=4", "calib.batch_size=4", "calib.act_init_size=4", "method=rtn_minmax", "logger=none"]


class ReachedFPEvaluation(Exception):
    pass


@pytest.fixture
def stop_at_fp_evaluation(monkeypatch):
    def fp_top1(*args, **kwargs):
        raise ReachedFPEvaluation

    monkeypatch.setattr("pdq.pipeline.fp_top1", fp_top1)


def test_more_class_folders_than_model_outputs(make_cfg, stop_at_fp_evaluation, tmp_path):
    write_images(tmp_path / "calib", 4)
    for c in range(11):
        write_images(tmp_path / "eval" / f"class{c:02d}", 1, seed=c)
    cfg = make_cfg(*FOLDER, f"data.root={tmp_path / 'calib'}", f"data.eval_root={tmp_path / 'eval'}")
    with pytest.raises(PdqError, match=rf"data=folder has 11 evaluation classes \(the class folders of "
                                       rf"data.eval_root='{re.escape(str(tmp_path / 'eval'))}'\) but the model has 10 "
                                       rf"outputs: .*accepted: at most 10 classes"):
        run(cfg)
    for keep in (10, 2):  # as many classes as outputs, or fewer: the run goes on to the FP evaluation
        for c in range(keep, 11):
            shutil.rmtree(tmp_path / "eval" / f"class{c:02d}", ignore_errors=True)
        with pytest.raises(ReachedFPEvaluation):
            run(cfg)


@pytest.mark.parametrize("role,bad", [("evaluation", "eval/b/1.png"), ("calibration", "calib/2.png")])
def test_an_undecodable_image_is_named_before_the_fp_evaluation(make_cfg, stop_at_fp_evaluation, tmp_path, role,
                                                                 bad):
    """Every evaluation file's header is read when the folder is indexed; the calibration images drawn (here all
    four) are decoded before the FP evaluation."""
    write_images(tmp_path / "calib", 4)
    for c in "ab":
        write_images(tmp_path / "eval" / c, 2)
    bad = tmp_path / bad
    good = bad.read_bytes()
    bad.write_bytes(b"not an image" * 20)
    cfg = make_cfg(*FOLDER, f"data.root={tmp_path / 'calib'}", f"data.eval_root={tmp_path / 'eval'}")
    with pytest.raises(PdqError, match=rf"^{role} image {re.escape(str(bad))} cannot be read: UnidentifiedImageError: "
                                       r".*accepted: image files PIL can decode"):
        run(cfg)
    bad.write_bytes(good)
    with pytest.raises(ReachedFPEvaluation):
        run(cfg)


def test_imagenet_without_root(make_cfg, no_heavy_work):
    fails(make_cfg, "data=imagenet", match=r"data.root is not set .*data=imagenet needs data.root=PATH")


def test_run_dir_that_cannot_be_written(make_cfg, no_heavy_work, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fails(make_cfg, f"paths.output_dir={blocker / 'run'}", match=r"the run dir .*a-file/run cannot be written")


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_cli_run_dir_that_cannot_be_created_is_one_line_before_hydra_writes_into_it(tmp_path, key):
    """Hydra creates the run (sweep) dir and writes its .hydra/ files before pdq's main starts: pdq's callback
    checks the dir first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli(*(["-m"] if "sweep" in key else []), "method=rtn_minmax", "logger=none", f"{key}={blocker / 'run'}",
                   timeout=120)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert (proc.stdout + proc.stderr).splitlines() == [
        f"pdq: error: the run dir {blocker / 'run'} cannot be written (Not a directory); accepted: a writable dir "
        f"({key}=PATH, or resume= a writable run dir)"]


def fake_results(cfg, *args, **kwargs):
    """quantize_and_evaluate without the work (for the end of a run)."""
    return {"quant_top1": 50.0, "config": {}}


@pytest.mark.parametrize("error,message", [
    ("ENOSPC", r"no space left to write into the run dir {run} .*: No space left on device; no partial file was left "
               r"and the saved state is intact \(atomic writes\); free space and run again \(resume={run} continues"),
    ("EACCES", r"the run dir {run} can no longer be written \({run}/results.json\): Permission denied; no partial file "
               r"was left and the saved state is intact \(atomic writes\); make it writable and run again "
               r"\(resume={run} continues"),
])
def test_full_disk_or_unwritable_run_dir_mid_run_is_one_clear_error(make_cfg, tmp_path, monkeypatch, error, message):
    import errno

    import pdq.pipeline as pipeline

    real = pipeline.atomic_write_json
    code = getattr(errno, error)

    def failing(path, obj):
        if str(path).endswith("results.json"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, obj)

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", fake_results)
    monkeypatch.setattr(pipeline, "atomic_write_json", failing)
    with pytest.raises(PdqError, match=message.format(run=re.escape(str(tmp_path)))):
        run(make_cfg(*SMALL))
    assert not (tmp_path / "results.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_per_layer_unknown_layer_before_data(make_cfg, no_heavy_work):
    fails(make_cfg, "quant.per_layer=[layer9.aq:8]", match=r"quant.per_layer names 'layer9.aq'.*accepted: conv1")


def test_online_wandb_without_credentials_fails_at_start(make_cfg, no_heavy_work, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    fails(make_cfg, "logger=wandb", "logger.offline=false",
          match=r"logger=wandb with logger.offline=false needs W&B credentials.*accepted: `wandb login`")
    assert not (tmp_path / "wandb").exists()


def test_logger_failure_at_the_end_keeps_results(make_cfg, tmp_path, monkeypatch):
    import pdq.loggers as loggers
    import pdq.pipeline as pipeline

    def broken(logger, ok):
        raise ConnectionError("upload failed")

    monkeypatch.setattr(pipeline, "quantize_and_evaluate", fake_results)
    monkeypatch.setattr(loggers, "close_logger", broken)
    with pytest.raises(PdqError, match=r"logger \(CSVLogger\) failed to finish: ConnectionError.*results.json is "
                                       r"written"):
        run(make_cfg(*SMALL[:-1], "logger=csv"))
    assert json.loads((tmp_path / "results.json").read_text())["quant_top1"] == 50.0


def test_num_workers_follows_the_machine(make_cfg, no_heavy_work):
    from pdq.data.settings import WORKER_CAP, available_cores, resolve_num_workers

    assert resolve_num_workers(None) == min(available_cores(), WORKER_CAP)
    assert ImageNetDataModule(root="/x").num_workers == min(available_cores(), WORKER_CAP)  # yaml default: null
    assert make_cfg("data=imagenet").data.num_workers is None
    fails(make_cfg, "data.num_workers=10000",
          match=rf"data.num_workers=10000 is not accepted: this process may use {available_cores()} CPU cores; "
                rf"accepted: null .* or an integer 0..{available_cores()}")
    fails(make_cfg, "data.num_workers=-1", match=r"data.num_workers=-1 is not accepted")


def test_data_root_that_is_not_used_is_reported(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.INFO, logger="pdq"):
        FashionMNISTDataModule(root=str(tmp_path / "empty")).prepare_data()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "holds no Fashion-MNIST IDX files" in warned[0].getMessage()
    assert str(fm.DEBIAN_ROOT) in warned[0].getMessage()
    used = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("Fashion-MNIST files:" in m and "train-images-idx3-ubyte" in m for m in used)
    caplog.clear()
    root = tiny_fmnist(tmp_path / "fmnist")
    with caplog.at_level(logging.INFO, logger="pdq"):
        FashionMNISTDataModule(root=str(root), download=False).prepare_data()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(root) in r.getMessage() for r in caplog.records)


def test_run_restores_global_state(make_cfg, no_heavy_work):
    levels = {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")}
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with pytest.raises(AssertionError, match="heavy work started"):  # past the point where the run sets them
        run(make_cfg(*SMALL))
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
        == before
    assert {n: logging.getLogger(n).level for n in levels} == levels


def test_run_computes_deterministically_without_filling_fresh_memory(make_cfg, monkeypatch):
    """Deterministic algorithms on, torch's NaN fill of every new tensor off (a pass over each temporary), no
    NVML-based CUDA check (a library load at every optimizer step on a machine without a GPU), and all three
    restored after the run."""
    seen = []

    def heavy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory,
                     os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")))
        raise AssertionError("heavy work started")

    monkeypatch.setattr(FashionMNISTDataModule, "setup", heavy)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as importing Lightning does
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with pytest.raises(AssertionError, match="heavy work started"):
        run(make_cfg(*SMALL))
    assert seen == [(True, False, None)]
    assert torch.utils.deterministic.fill_uninitialized_memory is fill
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_run_context_takes_the_config_values():
    from pdq.context import RunContext

    with pytest.raises(TypeError):
        RunContext(device=torch.device("cpu"))  # seed, calib.*, the preset's reconstruct_stem: from the config
    with pytest.raises(TypeError, match="channels_last"):
        RunContext(device=torch.device("cpu"), seed=1, batch_size=4, act_init_size=8, cache_dtype=torch.float16,
                   reconstruct_stem=True)
    ctx = RunContext(device=torch.device("cpu"), seed=1, batch_size=4, act_init_size=8, cache_dtype=torch.float16,
                     channels_last=True, reconstruct_stem=False)
    assert (ctx.batch_size, ctx.act_init_size, ctx.cache_dtype, ctx.channels_last, ctx.reconstruct_stem) == \
        (4, 8, torch.float16, True, False)


CLI_ERRORS = [(["data.eval_subset=-5"], "data.eval_subset=-5 is not accepted"),
              (["seed=-1"], "seed=-1 is not accepted"),
              (["keep_freed_memory=maybe"], "keep_freed_memory='maybe' is not accepted"),
              (["data=imagenet"], "data.root is not set")]


@pytest.mark.parametrize("overrides,message", CLI_ERRORS)
def test_the_checks_of_the_command_lines_values(make_cfg, overrides, message):
    with pytest.raises(PdqError, match=re.escape(message) + ".*accepted"):
        run(make_cfg(*overrides))


@pytest.mark.parametrize("overrides,message", CLI_ERRORS[1::2])
def test_cli_one_clear_line_and_exit_2(tmp_path, overrides, message):
    proc = run_cli(*overrides, f"hydra.run.dir={tmp_path}", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("pdq: error:")]
    assert len(errors) == 1 and message in errors[0] and "accepted" in errors[0]
    assert "Traceback" not in out and "FP top-1" not in out
    assert not (tmp_path / "results.json").exists()
