"""The one error type users see for bad input: a message naming the bad value and what is accepted."""

from __future__ import annotations

from typing import Any


class PdqError(ValueError):
    """Bad user input (config value, missing data folder, corrupt checkpoint)."""


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a PdqError raised by the target comes out as itself (Hydra wraps
    it in an InstantiationException, which would turn a clear message into a stack trace)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, PdqError):
            raise e.__cause__ from None
        raise
