"""Quantization methods. Each is built from `conf/method/*.yaml` by `hydra.utils.instantiate` and
exposes `name`, `iters` and `quantize(qmodel, calib, ctx) -> list of per-unit summaries`."""

from pdq.methods.recon import Reconstruction
from pdq.methods.rtn import RoundToNearest

__all__ = ["Reconstruction", "RoundToNearest"]
