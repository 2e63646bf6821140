"""OmegaConf resolvers used by conf/ (registered when pdq is imported)."""

from __future__ import annotations

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


OmegaConf.register_new_resolver("pdq.sweep_group", sweep_group, replace=True)
