"""The `pdq` command (also `python -m pdq`, and `python run.py` in a checkout).

* `pdq [overrides]` runs one quantization; Hydra's `-m`, named sweeps (`sweep=embedded`) and launchers work as
  usual, and `pdq --help` lists the config groups.
* `pdq export|report|sensitivity|cache ...` runs that tool, with the arguments of `pdq-export`, `pdq-report`,
  `pdq-sensitivity` and `pdq-cache`, which are installed too and are the same programs.
* `pdq --version` prints the installed version."""

from __future__ import annotations

import importlib
import logging
import sys

import pdq

log = logging.getLogger("pdq")

#: `pdq <name> ...`: the module whose `main(argv) -> int` runs that tool
TOOLS = {"export": "pdq.export.cli", "report": "pdq.report.cli", "sensitivity": "pdq.mixed.cli",
         "cache": "pdq.cache"}


def main() -> None:
    """The console script: a tool when the first argument names one, else one Hydra run (or multirun)."""
    args = sys.argv[1:]
    if args and args[0] in TOOLS:
        sys.exit(importlib.import_module(TOOLS[args[0]]).main(args[1:]))
    if "--version" in args or "-V" in args:
        print(f"pdq {pdq.__version__}")
        return
    import hydra

    from pdq.config import CONFIG_NAME, config_dir

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)(job)()


def job(cfg) -> float:
    """One Hydra job: the run of `cfg`; a `PdqError` is one line on stderr and exit status 2, Ctrl-C one line
    saying what was saved and exit status 130."""
    from pdq.errors import PdqError
    from pdq.host_memory import keep_freed_memory
    from pdq.pipeline import run

    if cfg.get("keep_freed_memory") is True:
        log.info("host memory: freed memory kept for reuse (keep_freed_memory=true): %s", keep_freed_memory())
    try:
        return run(cfg).get("quant_top1")  # None from a plan_only run
    except PdqError as e:
        log.error("%s", e)
        print(f"pdq: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: pdq.process.Interrupted says what the run saved
        log.warning("%s", e)
        print(f"pdq: {e}", file=sys.stderr)
        sys.exit(130)
