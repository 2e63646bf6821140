"""Backends: where the activation quantizers sit and which grids every quantizer uses, so that the model pdq
optimises is the model a runtime's integer kernels run (`quant.backend=`).

* `academic` (default): the placement of BRECQ, QDrop and PD-Quant (`pdq.quant.graph`): a quantizer at each
  conv/linear output (after its activation) except those that only feed residual adds, and at each add output;
  the image and the logits stay float; every grid unsigned affine [0, 2^b - 1].
* `onnxruntime` (x86): weights signed symmetric per output channel (int8 narrow range, zero point 0);
  activations uint8, with zero point 0 after ReLU/ReLU6 (the QuantizeLinear then makes the activation redundant
  and onnxruntime drops it) and affine elsewhere. Quantizers at the model input, at every conv/linear output
  (also those that only feed adds: QLinearConv needs a QuantizeLinear after the conv, QLinearAdd a
  DequantizeLinear on both inputs), at every add output after its ReLU, and right before every layer whose input
  comes from no quantizer (the classifier after pooling). Max pooling, flatten and reshape pass the grid of their
  input on (the export repeats that quantizer after them: onnxruntime runs them on the integers).
* `tensorrt`: every grid signed symmetric (weights int8 narrow range per output channel, activations int8 per
  tensor, zero point 0). Quantizers at the model input, at each conv output that does not feed an add, at the
  residual input of each add (the shortcut of an add of two convs), at every add output after its ReLU, and
  before every layer whose input comes from no quantizer. No quantizer between a conv and the add it fuses with.
Under both runtime backends a layer's bias is an int32 code at the scale s_in * s_w (its input quantizer's scale
times its weight scale, per output channel), in the simulation too (`QuantConv2d.quantized_bias`)."""

from __future__ import annotations

from dataclasses import dataclass

from pdq.errors import PdqError


@dataclass(frozen=True)
class Backend:
    name: str
    #: weight grid: signed symmetric per output channel (zero point 0), narrow range
    int_weights: bool = False
    #: activation codes signed (int8), else unsigned (uint8)
    signed_acts: bool = False
    #: a quantizer on the model input
    quantize_input: bool = False
    #: quantizers on conv/linear outputs that only feed adds: "none" (academic), "all" (onnxruntime) or
    #: "residual" (tensorrt: only an add's residual input, never the conv it fuses with)
    add_inputs: str = "none"
    #: a quantizer right before every conv/linear whose input comes from none
    layer_inputs: bool = False
    #: biases as int32 codes at s_in * s_w
    int32_bias: bool = False
    #: the export writes those codes with a DequantizeLinear (onnxruntime's QLinearConv/QGemm take them); else the
    #: bias is the float value of its code (TensorRT adds a float bias)
    bias_codes_in_graph: bool = False

    @property
    def runtime(self) -> bool:
        """A backend whose placement and grids follow a runtime's integer kernels (not the papers')."""
        return self.name != "academic"


BACKENDS = {
    "academic": Backend("academic"),
    "onnxruntime": Backend("onnxruntime", int_weights=True, signed_acts=False, quantize_input=True, add_inputs="all",
                           layer_inputs=True, int32_bias=True, bias_codes_in_graph=True),
    "tensorrt": Backend("tensorrt", int_weights=True, signed_acts=True, quantize_input=True, add_inputs="residual",
                        layer_inputs=True, int32_bias=True),
}


def get_backend(backend: str | Backend) -> Backend:
    """The backend of that name (or the backend itself); an unknown name is a PdqError listing the accepted."""
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise PdqError(f"quant.backend={backend!r} is unknown; accepted: {', '.join(BACKENDS)}")
    return BACKENDS[backend]
