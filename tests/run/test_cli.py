"""The `pdq` command: its tools as subcommands and as the `pdq-*` scripts, `--version`, `--help`, the config it
composes (a checkout's conf/, or the package pdq.conf of a wheel: tests/run/test_wheel.py) and a user's own
config folders the Hydra way."""

import configparser
import importlib
import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

import pdq
from pdq import cli
from pdq.config import compose, config_dir, hydra_initialized
from pdq.errors import PdqError
from tests.conftest import ROOT


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_tool_is_a_subcommand_and_a_script_running_the_same_main():
    scripts = console_scripts()
    assert scripts.pop("pdq") == "pdq.cli:main"
    assert sorted(scripts) == sorted(f"pdq-{name}" for name in cli.TOOLS)
    for name, module in cli.TOOLS.items():
        target_module, target = scripts[f"pdq-{name}"].split(":")
        assert getattr(importlib.import_module(target_module), target) is importlib.import_module(module).main


def test_a_subcommand_gets_the_arguments_after_its_name(monkeypatch, tmp_path, capsys):
    (tmp_path / "fp_top1").mkdir()
    monkeypatch.setattr(sys, "argv", ["pdq", "cache", "list", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0 and capsys.readouterr().out.strip().endswith("total: 0 entries, 0 B")
    monkeypatch.setattr(sys, "argv", ["pdq", "cache", "prune", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2 and capsys.readouterr().err.startswith("pdq cache: error: pdq cache prune removes")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(monkeypatch, capsys, flag):
    monkeypatch.setattr(sys, "argv", ["pdq", "method=qdrop", flag])
    cli.main()
    assert capsys.readouterr().out == f"pdq {pdq.__version__}\n"


def test_help_is_the_same_from_every_entry_point_and_lists_the_groups():
    outs = [subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120) for entry in (["-m", "pdq"], [str(ROOT / "run.py")])]
    assert all(out.returncode == 0 for out in outs) and outs[0].stdout == outs[1].stdout
    assert "pdq export|report|sensitivity|cache" in outs[0].stdout and "\nmethod: " in outs[0].stdout


def test_a_checkout_composes_its_own_conf_folder():
    assert config_dir() == ROOT / "conf"
    GlobalHydra.instance().clear()
    assert compose(["method=qdrop"]).method.name == "qdrop"
    with hydra_initialized(), pytest.raises(PdqError, match="inside a running Hydra app"):
        compose()


def test_a_users_config_folder_joins_by_searchpath_or_config_dir(tmp_path):
    """A user's own method file next to pdq's groups: `hydra.searchpath=[file://DIR]`, or `--config-dir DIR`."""
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "my_rtn.yaml").write_text("defaults:\n  - rtn_mse\n  - _self_\n\nname: my_rtn\n")
    for extra in ([f"hydra.searchpath=[file://{tmp_path}]"], ["--config-dir", str(tmp_path)]):
        out = subprocess.run([sys.executable, "-m", "pdq", "method=my_rtn", *extra, "--cfg", "job"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "name: my_rtn" in out.stdout and "_target_: pdq.methods.RoundToNearest" in out.stdout
