"""The run's Lightning logger, from its check to its finish: W&B credentials are checked before the work, the
logger is started before the work (a W&B run is initialised then), and `run_logger` finishes it on every exit
path, so that each job of a multirun is its own W&B run and a failed run is marked failed."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig

from pdq.errors import PdqError, cause, instantiate
from pdq.resume import keep_earlier_metrics, merge_metrics

log = logging.getLogger("pdq")


def _wandb_credentials() -> bool:
    """W&B's own sources: WANDB_API_KEY, or an entry for its host in the netrc file (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(cfg: DictConfig) -> None:
    """An online W&B logger needs credentials: say so now, not when the first metric is logged."""
    logger = cfg.get("logger")
    if not logger or not str(logger.get("_target_", "")).endswith("WandbLogger"):
        return
    if logger.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return
    if not _wandb_credentials():
        raise PdqError("logger=wandb with logger.offline=false needs W&B credentials, and none were found "
                       "(WANDB_API_KEY unset, no api.wandb.ai entry in ~/.netrc); accepted: `wandb login` or "
                       "WANDB_API_KEY=..., or logger.offline=true (sync later with `wandb sync`), or logger=csv")


def _is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def start_logger(cfg: DictConfig, resumed: bool):
    """The run's logger, started before the work: a W&B run is initialised now."""
    logger = instantiate(cfg.logger)
    if _is_wandb(logger):
        try:
            logger.experiment  # noqa: B018  (wandb.init)
        except Exception as e:
            raise PdqError(f"logger=wandb could not start a W&B run ({cause(e)}); accepted: "
                           f"logger.offline=true, W&B credentials (wandb login), or logger=csv") from None
    if resumed:
        keep_earlier_metrics(logger)
    return logger


def close_logger(logger, ok: bool) -> None:
    """Finish the run's logger; a W&B run is always finished, so each multirun job is its own run."""
    if logger is None:
        return
    logger.finalize("success" if ok else "failed")
    if _is_wandb(logger):
        import wandb

        wandb.finish(exit_code=0 if ok else 1)


def finish_logger(logger, ok: bool) -> None:
    """close_logger, then a resumed CSV log's earlier rows put back. A failure after a successful run is one
    clear error (results.json is already written); after a failed run it is logged, not raised over the cause."""
    try:
        close_logger(logger, ok)
        merge_metrics(logger)
    except Exception as e:
        message = f"the logger ({type(logger).__name__}) failed to finish: {type(e).__name__}: {e}"
        if ok:
            raise PdqError(f"{message}; results.json is written") from None
        log.error("%s", message)


@contextlib.contextmanager
def run_logger(cfg: DictConfig, resumed: bool, enabled: bool) -> Iterator[object | None]:
    """The run's logger (None without `logger=`, or where `enabled` is false: DDP ranks other than 0), finished
    when the block ends: as failed when it raised (KeyboardInterrupt and SystemExit included), else as a success."""
    logger = start_logger(cfg, resumed) if enabled and cfg.get("logger") else None
    try:
        yield logger
    except BaseException:
        finish_logger(logger, ok=False)
        raise
    finish_logger(logger, ok=True)
