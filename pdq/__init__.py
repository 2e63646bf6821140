"""pdq: post-training quantization (PD-Quant, QDrop, BRECQ, AdaRound, RTN) for CNNs."""

from pdq import config as _config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)

__version__ = "0.1.0"
