"""pdq as a user gets it: the wheel built from this checkout, installed with --no-deps into a fresh virtual
environment that sees this machine's packages (torch, Lightning, Hydra ...), and run from a folder outside the
checkout. `make wheel-test` runs this module on its own."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pdq
from tests.conftest import ROOT

#: a user's own CNN, importable from the folder the example runs in: not one of pdq's models
USER_CNN = '''
from torch import nn


class FiveLayerCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                      nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x))
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """The installed wheel: the venv's python and pdq, an environment without this checkout, a work folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp / "dist").glob("pdq-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True,
                   timeout=300)
    python, command = tmp / "venv" / "bin" / "python", tmp / "venv" / "bin" / "pdq"
    # --force-reinstall: this machine's own pdq (an editable install of the checkout) would satisfy the requirement
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = tmp / "work"
    work.mkdir()
    return {"python": str(python), "pdq": str(command), "env": {**env, "WANDB_MODE": "offline"}, "work": work,
            "site": tmp / "venv" / "lib"}


def call(venv: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=venv["work"], env=venv["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_the_installed_package_and_its_configs_come_from_the_wheel(venv):
    proc = call(venv, venv["python"], "-c", "import pdq, pdq.config; print(pdq.__file__); "
                "print(pdq.config.config_dir()); print(pdq.__version__)")
    package, conf, version = proc.stdout.split()
    assert Path(package).is_relative_to(venv["site"]) and Path(conf).is_relative_to(venv["site"])
    assert Path(conf).name == "conf" and Path(conf).parent.name == "pdq" and version == pdq.__version__
    assert not Path(package).is_relative_to(ROOT)


def test_pdq_help_and_version(venv):
    assert call(venv, venv["pdq"], "--version").stdout.strip() == f"pdq {pdq.__version__}"
    out = call(venv, venv["pdq"], "--help").stdout
    assert "pdq export|report|sensitivity|cache" in out and "== Config groups" in out
    assert re.search(r"^method: .*pdquant.*qdrop", out, re.M) and re.search(r"^quant: .*w4a4", out, re.M)


def test_a_pdq_run_and_pdq_load_of_its_result(venv):
    run_dir = venv["work"] / "run"
    proc = call(venv, venv["pdq"], "debug=fast", "method=rtn_mse", "quant=w4a4", "logger=none",
                f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "rtn_mse" and results["quant_top1"] > 80, proc.stdout[-2000:]
    assert (run_dir / "run.log").is_file()
    code = (f"import pdq, torch\nm = pdq.load({str(run_dir)!r}, device='cpu')\n"
            "print(tuple(m(torch.zeros(2, 1, 28, 28)).shape), isinstance(m, torch.nn.Module), m.training)")
    assert call(venv, venv["python"], "-c", code).stdout.split() == ["(2,", "10)", "True", "False"]
    report = call(venv, venv["pdq"], "report", str(run_dir), "--out", str(venv["work"] / "report"))
    assert "rtn_mse" in report.stdout and (venv["work"] / "report" / "table.md").is_file()


def test_the_readme_python_example_on_a_users_cnn(venv):
    """The README's example as it is printed, with a CNN of the user's own in place of the bundled model and
    fewer steps."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- python-example -->")[1].split("```python")[1].split("```")[0]
    code, n = re.subn(r"^model = .*$", "from my_cnn import FiveLayerCNN\nmodel = FiveLayerCNN()", code, flags=re.M)
    assert n == 1, "the README example has no `model = ...` line"
    (venv["work"] / "my_cnn.py").write_text(USER_CNN)
    (venv["work"] / "example.py").write_text(re.sub(r"iters=\d+", "iters=2", re.sub(r"dc_steps=\d+", "dc_steps=2",
                                                                                      code)))
    proc = call(venv, venv["python"], "example.py")
    assert re.search(r"^top-1 \d+\.\d\d% FP -> \d+\.\d\d% W4A4$", proc.stdout, re.M), proc.stdout
    assert "[pdq][INFO]" in proc.stderr and "Traceback" not in proc.stderr
