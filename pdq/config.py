"""Where pdq's Hydra configs are and how they are composed, and the OmegaConf resolvers conf/ uses.

The YAML lives in the repository's top-level `conf/`; a wheel carries it as the package `pdq.conf`
(setup.py maps the one to the other). `config_dir()` finds it either way, and `compose()` is the one way
pdq's Python entry points (`pdq.quantize`, `pdq sensitivity`), the `pdq` command (`pdq.cli`) and the tests
compose it, so that a checkout and an installed wheel compose the same config. The resolvers are registered
only while a run resolves its config (`resolvers()`), so that importing pdq leaves OmegaConf as it was."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pdq.errors import PdqError

CONFIG_PACKAGE = "pdq.conf"
CONFIG_NAME = "config"


def config_dir() -> Path:
    """pdq's config folder: the `conf/` beside this pdq when it runs from a checkout (an editable install
    included), else the installed package `pdq.conf`."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "conf" / f"{CONFIG_NAME}.yaml").is_file():
        return root / "conf"
    try:
        installed = Path(str(importlib.resources.files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:
        installed = None
    if installed is None or not (installed / f"{CONFIG_NAME}.yaml").is_file():
        raise PdqError(f"pdq's configs are neither in {root / 'conf'} (a checkout) nor in the package "
                       f"{CONFIG_PACKAGE} (an installed wheel); accepted: pdq installed from its wheel or checkout")
    return installed


@contextlib.contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra initialised with pdq's config folder inside the block, where `hydra.compose` works. Not inside a
    running Hydra app: Hydra is initialised once per process."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        raise PdqError("pdq composes its own config and cannot do so inside a running Hydra app; accepted: "
                       "pdq.pipeline.run(cfg) from a Hydra main")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield


def compose(overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """pdq's config (`conf/config.yaml`) composed with `overrides`, as the `pdq` command composes it; raises
    Hydra's errors for unknown groups or keys."""
    from hydra import compose as hydra_compose

    with hydra_initialized():
        return hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)


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


#: a key of `SAVED_BEFORE` whose value did not matter in runs saved before it existed (its feature was off)
UNUSED = object()
#: keys that the configs did not always have, with what a saved fingerprint or results.json without the key means:
#: conf/trainer/_base.yaml did not always set strategy and num_nodes (Lightning's defaults ran), and the weight
#: scales were not learned before `method.learn_weight_scale` existed (its lr and optimiser then played no part),
#: every unit had `method.iters` steps before `method.steps` existed, and no units were merged before
#: `method.unit_merges`
SAVED_BEFORE = {"trainer.strategy": "auto", "trainer.num_nodes": 1, "method.learn_weight_scale": False,
                "method.weight_scale_lr": UNUSED, "method.weight_scale_optimizer": UNUSED,
                "method.steps": "uniform", "method.step_budget": 1.0, "method.step_bounds": UNUSED,
                "method.unit_merges": 0}


def unused_before(key: str) -> bool:
    """Whether `key` (or a group it is in) played no part in runs saved before it existed (`SAVED_BEFORE`)."""
    parts = key.split(".")
    return any(SAVED_BEFORE.get(".".join(parts[:i])) is UNUSED for i in range(1, len(parts) + 1))
