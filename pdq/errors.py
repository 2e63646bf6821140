"""The one error type users see for bad input: a message naming the bad value and what is accepted."""

from __future__ import annotations

import inspect
import re
from typing import Any


class PdqError(ValueError):
    """Bad user input (config value, missing data folder, corrupt checkpoint)."""


def cause(e: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` (cut at `limit`), to quote a library's exception in one line."""
    detail = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}{': ' + detail if detail else ''}"


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a PdqError raised by the target comes out as itself (Hydra wraps
    it in an InstantiationException, which would turn a clear message into a stack trace), and a key the
    target does not take (`++method.iters=...` on a round-to-nearest method) becomes a PdqError naming it
    and the accepted keys."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, PdqError):
            raise e.__cause__ from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e.__cause__ or ""))
        if isinstance(e.__cause__, TypeError) and unknown and hasattr(config, "get"):
            name = config.get("name", config.get("_target_"))
            target = get_object(config["_target_"])
            accepted = [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
            raise PdqError(f"{unknown.group(1)}={config.get(unknown.group(1))!r} is not a setting of {name} "
                           f"({config['_target_']}); accepted: {', '.join(accepted)}") from None
        raise
