"""Quantization methods. Each is built from `conf/method/*.yaml` by `hydra.utils.instantiate` and is a `Method`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pdq.methods.recon import Reconstruction
from pdq.methods.rtn import RoundToNearest

if TYPE_CHECKING:
    import torch
    from torch import fx

    from pdq.context import RunContext


@runtime_checkable
class Method(Protocol):
    """What a run needs of a method (a `method=` config's `_target_`, pdq's or a user's)."""

    name: str
    iters: int                      # steps per unit (0: no reconstruction), for results.json
    components: dict[str, bool]     # which of PD-Quant's components it uses: {"pd", "reg", "dc"}

    def unit_table(self, qmodel: fx.GraphModule) -> list[dict]:
        """The units it will reconstruct, one row each (`pdq.recon.units`), before any work."""

    def quantize(self, qmodel: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> list[dict]:
        """Quantize `qmodel` in place on the calibration images; one summary per unit."""


__all__ = ["Method", "Reconstruction", "RoundToNearest"]
