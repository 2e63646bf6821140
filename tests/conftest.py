import contextlib
import functools
import inspect
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from pdq.config import compose, config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = config_dir()  # the checkout's conf/, composed as the `pdq` command composes it
os.environ.setdefault("WANDB_MODE", "offline")
EVAL = 256  # Fashion-MNIST test images per parity check


#: names whose use makes a test `heavy`: it runs pdq's pipeline (in this process or in a subprocess) or spawns
#: processes
HEAVY = {"run", "execute", "quantize", "run_cli", "kill_after_unit", "interrupt_at", "subprocess", "runs", "spawn"}


def _names(code) -> set[str]:
    """The global names a code object and the code nested in it (comprehensions, lambdas) use."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if inspect.iscode(c)))


def _uses(fn, names: set[str], seen: set | None = None) -> bool:
    """Whether `fn`, or a function of the tests that it calls by name, uses one of `names`."""
    seen = set() if seen is None else seen
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    used = _names(code)
    if used & names:
        return True
    module = sys.modules.get(fn.__module__)
    return any(_uses(getattr(module, n), names, seen) for n in used
               if inspect.isfunction(getattr(module, n, None)) and getattr(module, n).__module__.startswith("tests"))


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs the pipeline or spawns processes, directly, through a helper of the tests or
    through a fixture, as `heavy`: `make test-fast` (-m "not slow and not heavy") leaves those out."""
    for item in items:
        fixtures = [item.session._fixturemanager.getfixturedefs(name, item) for name in item.fixturenames]
        fns = [item.function] + [defs[-1].func for defs in fixtures if defs]
        if any(_uses(fn, HEAVY) for fn in fns):
            item.add_marker(pytest.mark.heavy)


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
        return compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", *overrides])
    return _make


def compose_config(*overrides: str):
    """The real composed config (conf/config.yaml) with `overrides`, outside any test's tmp dir."""
    GlobalHydra.instance().clear()
    return compose(overrides)


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


def start_run(run_dir: Path, *args: str, stderr=subprocess.DEVNULL, **env_vars: str) -> subprocess.Popen:
    """`python run.py ARGS hydra.run.dir=RUN_DIR` in a process group of its own (its DDP ranks too), stdout read
    line by line."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **env_vars}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)


def read_until(proc: subprocess.Popen, until, what: str, timeout: float = 300) -> list[str]:
    """The lines the run prints up to the first for which `until(line)` holds. A run that ends first fails the
    test; one that prints no such line in `timeout` seconds (a hung rank) is killed, and fails it too."""
    def kill():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if until(line):
                return seen
    finally:
        timer.cancel()
    raise AssertionError(f"the run ended (rc {proc.wait()}) before it {what}")


def kill_after_unit(run_dir: Path, *args: str, index: int = 3, **env_vars: str) -> None:
    """Start the run and SIGKILL its whole process group (every DDP rank too) at the unit boundary the run
    reports: the log line that its state is saved after unit `index` of its first phase. The next unit takes far
    longer than reading a line, so the saved state ends at that unit."""
    import re

    saved = re.compile(r"saved \S+ after phase 0 unit (\d+) ")
    proc = start_run(run_dir, *args, **env_vars)
    try:
        read_until(proc, lambda line: (found := saved.search(line)) is not None and int(found.group(1)) >= index,
                   f"reported unit {index} saved")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def interrupt_at(run_dir: Path, *args: str, line: str, ready=lambda: True,
                 **env_vars: str) -> subprocess.CompletedProcess:
    """Start the run and send its process group SIGINT, as Ctrl-C in a terminal does, once it has logged a line
    matching `line` and then `ready()` holds; returns the ended process (stdout, stderr and exit status)."""
    import re
    import tempfile
    import time

    pattern = re.compile(line)
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: the run never waits on a full stderr pipe
        proc = start_run(run_dir, *args, stderr=err, **env_vars)
        try:
            seen = read_until(proc, pattern.search, f"logged {line!r}")
            deadline = time.monotonic() + 300
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended, or took too long"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            seen.append(proc.communicate(timeout=300)[0])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen), err.read())


def glibc() -> bool:
    """Whether this Python runs on glibc, whose `mallopt` `pdq.host_memory` sets."""
    import platform

    return platform.libc_ver()[0] == "glibc"


def transparent_hugepages() -> str:
    """The kernel's transparent-huge-page mode (always, madvise, never), or "" where it cannot be read."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""
