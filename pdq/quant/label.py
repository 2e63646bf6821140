"""How logs and reports name a bit setting (no torch: the report imports it)."""

from __future__ import annotations


def bit_setting(w_bits: int, a_bits: int, budget: dict | None = None) -> str:
    """A bit setting as reports and logs name it: `W4A4`; a quant=mixed layout (`budget` given, its w_bits only
    the width before the allocation) by its budget, `mixed avg_w_bits=2.5 A4` (`mixed A4` before one is set)."""
    if budget is None:
        return f"W{w_bits}A{a_bits}"
    return " ".join(["mixed", *(f"{key}={value:g}" for key, value in budget.items()), f"A{a_bits}"])
