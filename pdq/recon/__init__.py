"""Reconstruction: units of a quantized graph (`units`, `subgraph`), what one pass over them does
(`phase`), the loss terms (`losses`), Distribution Correction (`dc`), one unit's Lightning fit (`module`)
and the sequential loop over units (`engine`)."""

from pdq.recon.units import BLOCK_TYPES, Unit, find_units, register_block

__all__ = ["BLOCK_TYPES", "Unit", "find_units", "register_block"]
