"""Range checks for user settings: each raises one `PdqError` naming the key, the value and what is accepted.
NaN and inf are never accepted; booleans are not numbers here."""

from __future__ import annotations

import math
from typing import Any

from pdq.errors import PdqError


def _fail(key: str, value: Any, accepted: str) -> None:
    raise PdqError(f"{key}={value!r} is not accepted; accepted: {accepted}")


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "finite"


def _in_range(value: float, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return False
    return not (hi is not None and (value > hi or (hi_open and value == hi)))


def check_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, lo, hi, False, False):
        _fail(key, value, f"an integer {_bounds(lo, hi, False, False)}")
    return value


def check_float(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in the given range (`lo_open` / `hi_open`: the bound itself is excluded)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not _in_range(value, lo, hi, lo_open, hi_open)):
        _fail(key, value, f"a finite number {_bounds(lo, hi, lo_open, hi_open)}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def check_choice(key: str, value: Any, choices: tuple | list) -> Any:
    if value not in choices:
        _fail(key, value, ", ".join(map(str, choices)))
    return value


def flatten(obj, prefix: str) -> dict:
    """{'a.b.c': value} for every leaf of a nested dict (an empty dict is a leaf)."""
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}
