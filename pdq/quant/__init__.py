"""Quantization core: pure math (`functional`), observers, fake-quant modules, BN folding, the fx pass
that builds a quantized model, bit layouts and state switches."""

from pdq.quant.functional import fake_quantize, qparams_from_range, round_ste
from pdq.quant.graph import act_quant_names, quant_layer_names, quantize_model
from pdq.quant.layout import BitLayout, apply_layout
from pdq.quant.observers import CosineObserver, LpObserver, MinMaxObserver, Observer
from pdq.quant.quantizers import ActQuantizer, FakeQuantizer, WeightQuantizer
from pdq.quant.state import act_quantizers, calibrate_activations, calibrate_weights, set_quant_state

__all__ = [
    "ActQuantizer", "BitLayout", "CosineObserver", "FakeQuantizer", "LpObserver", "MinMaxObserver", "Observer",
    "WeightQuantizer", "act_quant_names", "act_quantizers", "apply_layout", "calibrate_activations",
    "calibrate_weights", "fake_quantize", "qparams_from_range", "quant_layer_names", "quantize_model",
    "round_ste", "set_quant_state",
]
