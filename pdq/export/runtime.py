"""onnxruntime CPU sessions of an exported model (`session`), with the optimiser rules pdq turns off for it
(`disabled_optimizers`, also used by the fusion audit)."""

from __future__ import annotations

from pathlib import Path


def session(path: str | Path, threads: int | None = None, fuse: bool = False):
    """An onnxruntime CPU session of an exported model.

    `fuse=False` turns off onnxruntime's QDQ transformers (`session.disable_quant_qdq`): QuantizeLinear and
    DequantizeLinear run as written and the layers in float, which is pdq's own arithmetic. `fuse=True` keeps
    onnxruntime's defaults: at 8 bits it fuses DQ -> Conv -> Q into integer kernels (QLinearConv), and it rounds
    each float bias to int32 at scale s_in * s_w (its WeightBiasQuantization), which below 8 bits is a coarse
    grid (ResNet-20 W4A4: logits move by up to 2.7). onnxruntime 1.32's ClipQuantFusion also fails on a Clip
    (ReLU6) before a 4-bit QuantizeLinear ("Unexpected data type for QuantizeLinear input y_zero_point of 21"):
    that rule (ClipQuantRewrite) is turned off for a model with a type below 8 bits (it only drops a Clip the grid
    makes redundant; at 8 bits it is what lets a conv followed by ReLU6 fuse)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not fuse:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(path))


def disabled_optimizers(path: str | Path) -> list[str]:
    """The onnxruntime rules a session of this model turns off: ClipQuantRewrite where a type below 8 bits is used
    (`session`)."""
    import onnx
    from onnx import TensorProto

    narrow = {TensorProto.UINT4, TensorProto.INT4, TensorProto.UINT2, TensorProto.INT2}
    model = onnx.load(str(path), load_external_data=False)
    return ["ClipQuantRewrite"] if any(init.data_type in narrow for init in model.graph.initializer) else []
