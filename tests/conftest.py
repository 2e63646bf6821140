import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config (conf/config.yaml) with overrides; outputs go to tmp_path."""
    def _make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[f"paths.output_dir={tmp_path}",
                                                 f"paths.cache_dir={tmp_path}/cache", *overrides])
    return _make


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess (stdout+stderr captured)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
