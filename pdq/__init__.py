"""pdq: post-training quantization (PD-Quant, QDrop, BRECQ, AdaRound, RTN) for CNNs."""

__version__ = "0.1.0"
