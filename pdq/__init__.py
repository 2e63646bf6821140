"""pdq: post-training quantization (PD-Quant, QDrop, BRECQ, AdaRound, RTN) for CNNs.

`pdq.quantize(model, images, method=..., bits=..., **overrides)` is the Python entry point (`pdq.api`);
`pdq.load(run_dir_or_file, device=...)` gives a finished run's quantized model back (`pdq.export`)."""

__version__ = "0.2.0"
__all__ = ["load", "quantize"]


def __getattr__(name: str):
    if name == "quantize":  # imported on first use: `import pdq` stays light
        from pdq.api import quantize

        return quantize
    if name == "load":
        from pdq.export.checkpoint import load

        return load
    raise AttributeError(f"module 'pdq' has no attribute {name!r}")
