"""Importing pdq, any of its modules, or run.py changes no global state: warning filters, logger levels, the
environment, torch's switches, OmegaConf's resolvers, Lightning's rank-zero switch."""

import json
import subprocess
import sys

from tests.conftest import ROOT

#: every module of the package, found from its files (importing it to walk it would spoil the "before")
NAMES = ["run"] + sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                         for p in (ROOT / "pdq").rglob("*.py") if p.stem != "__main__")

STATE = """
import logging, os, warnings, torch
from omegaconf import OmegaConf
from lightning.fabric.utilities.rank_zero import rank_zero_only

def state():
    loggers = {name: getattr(lg, "level", None) for name, lg in logging.root.manager.loggerDict.items()}
    return {"filters": [repr(f) for f in warnings.filters], "root": logging.root.level,
            "levels": {k: v for k, v in loggers.items() if v},
            "environ": dict(os.environ), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "resolver": OmegaConf.has_resolver("pdq.sweep_group"),
            "rank_zero": getattr(rank_zero_only, "rank", None)}
"""


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_importing_every_pdq_module_changes_no_global_state():
    # the third-party modules pdq's imports pull in are imported first, so that only pdq's own effects count
    others = json.loads(_python(f"""
import importlib, json, sys
for n in {NAMES!r}:
    importlib.import_module(n)
print(json.dumps(sorted(m for m in sys.modules if not m.startswith("pdq") and m != "run")))
"""))
    result = json.loads(_python(STATE + f"""
import importlib, json
for m in {others!r}:
    try:
        importlib.import_module(m)
    except Exception:
        pass
before = state()
for n in {NAMES!r}:
    importlib.import_module(n)
print(json.dumps({{"before": before, "after": state()}}))
"""))
    assert len(NAMES) > 30 and "pdq.recon.engine" in NAMES
    assert not any(m.startswith("pdq") or m == "run" for m in others)
    before, after = result["before"], result["after"]
    for key in before:
        assert after[key] == before[key], key


def _pdq_imports(path) -> set[str]:
    """The pdq modules a file imports, at any depth (function-level imports too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pdq")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pdq"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


#: the layers that run the work never import the ones that present or orchestrate it
CORE = ("pdq.quant", "pdq.recon", "pdq.mixed", "pdq.export", "pdq.methods", "pdq.models", "pdq.data")
TOP = ("pdq.report", "pdq.pipeline", "pdq.api", "pdq.launch")


def _module(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_the_core_never_imports_the_layers_above_it():
    wrong = {}
    for path in (ROOT / "pdq").rglob("*.py"):
        if _module(path).startswith(CORE):
            bad = sorted(m for m in _pdq_imports(path) if m.startswith(TOP))
            if bad:
                wrong[_module(path)] = bad
    assert not wrong, wrong
    assert "pdq.quant.layout" in {_module(p) for p in (ROOT / "pdq").rglob("*.py")}  # the walk sees the core


def test_no_module_imports_another_modules_private_names():
    import ast

    wrong = []
    for path in [*(ROOT / "pdq").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pdq"):
                wrong += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
    assert not wrong, wrong


def test_the_report_loads_without_torch():
    assert _python("import sys, pdq.report.cli; print('torch' in sys.modules)") == "False"
