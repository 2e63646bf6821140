"""Reconstruction: cutting a quantized graph into units, and (next) the per-unit Lightning loop."""

from pdq.recon.units import BLOCK_TYPES, Unit, find_units, register_block

__all__ = ["BLOCK_TYPES", "Unit", "find_units", "register_block"]
