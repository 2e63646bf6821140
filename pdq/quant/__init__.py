"""Quantization core: pure math (`functional`), observers, fake-quant modules, BN folding, the fx pass
that builds a quantized model, bit layouts and state switches.

The names below load their module on first use, so that a light module of this package (`pdq.quant.label`, which
the report reads) can be imported without torch."""

from __future__ import annotations

import importlib

_HOME = {
    "fake_quantize": "functional", "qparams_from_range": "functional", "round_ste": "functional",
    "act_quant_names": "graph", "quant_layer_names": "graph", "quantize_model": "graph",
    "BitLayout": "layout", "apply_layout": "layout", "bit_setting": "label",
    "CosineObserver": "observers", "LpObserver": "observers", "MinMaxObserver": "observers", "Observer": "observers",
    "ActQuantizer": "quantizers", "FakeQuantizer": "quantizers", "WeightQuantizer": "quantizers",
    "act_quantizers": "state", "calibrate_activations": "state", "calibrate_weights": "state",
    "set_quant_state": "state",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'pdq.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pdq.quant.{_HOME[name]}"), name)
