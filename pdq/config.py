"""The OmegaConf resolvers conf/ uses, registered only while a run resolves its config (`resolvers()`),
so that importing pdq leaves OmegaConf as it was."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from omegaconf import OmegaConf


def sweep_group(default: str) -> str:
    """The W&B group of a job: its sweep dir (relative to the launch dir) in a Hydra multirun, so that a
    sweep's jobs are one group; `default` for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return default
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return default
    sweep = Path(hc.runtime.output_dir).parent
    try:
        return str(sweep.relative_to(Path(hc.runtime.cwd)))
    except ValueError:
        return str(sweep).lstrip(os.sep)


RESOLVERS = {"pdq.sweep_group": sweep_group}


@contextlib.contextmanager
def resolvers():
    """pdq's resolvers registered inside the block; those that were not registered before are removed after."""
    added = [name for name in RESOLVERS if not OmegaConf.has_resolver(name)]
    for name in added:
        OmegaConf.register_new_resolver(name, RESOLVERS[name])
    try:
        yield
    finally:
        for name in added:
            OmegaConf.clear_resolver(name)
