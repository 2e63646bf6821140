"""Hydra callbacks of the command line (`hydra.callbacks` in conf/config.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pdq.errors import PdqError
from pdq.io import check_writable


class RunDirCheck(Callback):
    """The run dir (a multirun's sweep dir) takes a file before Hydra creates it and writes its .hydra/ files and
    its log there: where it cannot, one `pdq: error:` line and exit status 2, as for any bad input, instead of
    Hydra's traceback. (The dir is the one Hydra creates next: `${now:...}` is resolved once per config.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.sweep.dir")


def _check(config: DictConfig, key: str) -> None:
    try:
        check_writable(Path(str(OmegaConf.select(config, key))), key)
    except PdqError as e:
        print(f"pdq: error: {e}", file=sys.stderr)
        sys.exit(2)
