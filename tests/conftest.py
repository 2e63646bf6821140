import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "offline")
EVAL = 256  # Fashion-MNIST test images per parity check


@pytest.fixture(scope="module")
def data():
    """128 calibration images and the first `EVAL` test images with their labels (the export and backend tests)."""
    import torch

    from pdq.data.fashion_mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule(eval_subset=EVAL)
    dm.prepare_data()
    dm.setup()
    x, y = map(torch.cat, zip(*dm.test_dataloader()))
    return {"calib": dm.calibration_set(128, 0), "x": x, "y": y}


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config (conf/config.yaml) with overrides; outputs go to tmp_path."""
    def _make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"paths.output_dir={tmp_path}",
                                                 f"paths.cache_dir={tmp_path}/cache", *overrides])
    return _make


def compose_config(*overrides: str):
    """The real composed config (conf/config.yaml) with `overrides`, outside any test's tmp dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@functools.cache
def _quant_config() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config("quant=w4a4").quant)


def make_layout(w_bits: int, a_bits: int, **overrides):
    """A `BitLayout` as conf/quant builds it (conf/quant/_base.yaml's values) at `w_bits`/`a_bits`, with
    `overrides` (layout=, per_layer=, backend=, ...), so that tests use the YAML's values and not a copy of them."""
    from pdq.errors import instantiate

    return instantiate({**_quant_config(), "w_bits": w_bits, "a_bits": a_bits, **overrides}, _convert_="all")


def make_phase(method: str = "qdrop", index: int = 0, **settings):
    """Phase `index` of a method as composed from conf/ (`method.<key>=value` for each setting), so that
    tests use the YAML's values and not a copy of them."""
    from pdq.errors import instantiate

    cfg = compose_config(f"method={method}", *(f"method.{k}={v}" for k, v in settings.items()))
    return instantiate(cfg.method).phases[index]


def make_dc(**overrides):
    """PD-Quant's composed DC settings with `overrides`."""
    from dataclasses import replace

    return replace(make_phase("pdquant").dc, **overrides)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess (stdout+stderr captured), with `env_vars` added to its environment."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **env_vars}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_after_unit(run_dir: Path, *args: str, index: int = 3, **env_vars: str) -> None:
    """Start `python run.py ARGS hydra.run.dir=RUN_DIR` and SIGKILL its whole process group (every DDP
    rank too) as soon as its saved reconstruction state has passed unit `index`."""
    import torch

    from pdq.recon.engine import STATE_FILE

    env = {**os.environ, "WANDB_MODE": "offline", **env_vars}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={run_dir}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            state = run_dir / STATE_FILE
            if state.exists() and torch.load(state, weights_only=False)["index"] >= index:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
