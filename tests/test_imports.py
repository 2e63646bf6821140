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


def test_every_third_party_import_is_declared_and_every_requirement_is_imported():
    """Each distribution whose module pdq imports (anywhere, also inside functions) is a requirement of
    setup.cfg (install_requires or an extra), and each install_requires entry is imported by pdq."""
    import ast
    import configparser
    import re
    from importlib.metadata import packages_distributions

    def names(spec: str) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", line).group().lower().replace("_", "-")
                for line in spec.split("\n") if line.strip() and not line.strip().startswith("pdq[")}

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = names(cfg["options"]["install_requires"])
    extras = set().union(*(names(spec) for spec in cfg["options.extras_require"].values()))
    modules = set()
    for path in [*(ROOT / "pdq").rglob("*.py"), ROOT / "run.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"pdq"}
    dists = packages_distributions()
    imported = {}
    for module in sorted(third_party):
        assert module in dists, f"pdq imports {module}, which no installed distribution provides"
        imported[module] = {d.lower().replace("_", "-") for d in dists[module]}
    undeclared = {m: d for m, d in imported.items() if not d & (required | extras)}
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"
    unused = required - set().union(*imported.values())
    assert not unused, f"install_requires entries pdq never imports: {sorted(unused)}"
