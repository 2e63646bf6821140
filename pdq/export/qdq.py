"""QDQ graph surgery: the graph torch's exporter wrote of the deploy copy (`pdq.export.onnx.deploy_copy`) given pdq's
real grids, which the exporter cannot express below 8 bits:
* each quantized weight becomes an integer initialiser of its own type (int2/uint2 from opset 25, int4/uint4 from
  opset 21, else int8/uint8; signed for the runtime backends' symmetric grids) feeding a per-channel
  `DequantizeLinear` (axis 0);
* each activation pair gets its quantizer's scale and zero point, with a zero point of the same types;
* a width with no type of its own at the opset (3 bits; 2 bits below opset 25; 2-4 bits below 21), and a signed
  activation grid below 8 bits (onnxruntime 1.32 ran int4 activation Q/DQ wrongly in pdq's tests), is stored in the
  next wider type (int8 for those activations); an activation's dequantized value then passes a `Clip` to its real
  grid (after `DequantizeLinear`: onnxruntime cannot fuse a Clip into a 4-bit QuantizeLinear), and a weight's codes
  lie on the real grid already;
* under the onnxruntime backend each bias on the int32 grid becomes int32 codes with a per-channel `DequantizeLinear`
  at s_in * s_w (what QLinearConv and QGemm take);
* under a runtime backend, a max pooling, flatten or reshape whose input is dequantized gets the same quantizer again
  after it, so that the runtime moves the integers through it and the next layer reads a `DequantizeLinear` (the same
  values: these ops keep codes on their grid).

Activation tags. In the deploy copy each activation quantizer is a uint8 QuantizeLinear/DequantizeLinear pair whose
scale is not a scale but a tag: the quantizer's 1-based index in the list `acts` (`tag_scale`), a whole number that
float32 holds exactly and no exporter pass changes. `qdq_surgery` reads it back from each exported QuantizeLinear
(`tag_of`) to find that quantizer's real scale, zero point and grid; the tags leave no trace in the result."""

from __future__ import annotations

import torch

from pdq.errors import PdqError
from pdq.export.checkpoint import unsigned_codes
from pdq.export.pack import pack

#: ops whose output keeps the integer codes of their input (onnxruntime moves int8/uint8 through them)
PASS_THROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze")


def tag_scale(index: int) -> float:
    """The scale that tags activation quantizer `index` (1-based, in `acts` order) in the deploy copy's Q/DQ pair."""
    return float(index)


def tag_of(scale_initializer) -> int:
    """The index (`tag_scale`) an exported QuantizeLinear's scale initializer tags."""
    from onnx import numpy_helper

    return int(round(float(numpy_helper.to_array(scale_initializer))))


#: the opset from which ONNX has an integer type of this width (uint2/int2, uint4/int4); 8 bits: every opset
OWN_TYPE_OPSET = {2: 25, 4: 21}


def container_bits(bits: int, opset: int) -> int:
    """The width of the ONNX integer type that holds `bits`-bit codes at `opset`: the narrowest at least `bits`
    wide that the opset has."""
    return next((width for width, first in sorted(OWN_TYPE_OPSET.items()) if bits <= width and opset >= first), 8)


def tensor_type(bits: int, signed: bool = False):
    """The ONNX TensorProto type of `bits`-bit (u)int codes (int32 only signed)."""
    from onnx import TensorProto

    if signed:
        return {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8, 32: TensorProto.INT32}[bits]
    return {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}[bits]


def int_tensor(name: str, codes: torch.Tensor, width: int, signed: bool = False):
    """An initializer of type (u)int`width` holding `codes` (signed ones in two's complement), packed as ONNX packs
    2- and 4-bit types (raw data, the lowest bits first: `pdq.export.pack`'s layout)."""
    from onnx import helper, numpy_helper

    if width == 32:
        return numpy_helper.from_array(codes.to(torch.int32).numpy(), name)
    raw = bytes(pack(unsigned_codes(codes, width) if signed else codes, width).numpy())
    return helper.make_tensor(name, tensor_type(width, signed), list(codes.shape), raw, raw=True)


def qdq_surgery(model, weights: dict, acts: list, opset: int, biases: dict | None = None,
                pass_through: bool = False):
    """Give the exported graph pdq's integer weights, activation grids and (`biases`) int32 biases, and with
    `pass_through` repeat a quantizer after the ops that keep its codes (see the module docstring). `weights`,
    `acts` and `biases` are the deploy copy's (`pdq.export.onnx.deploy_copy`)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {init.name: init for init in g.initializer}
    head = []
    for name, (codes, scale, zero_point, grid) in weights.items():
        init = inits.get(f"{name}.weight")
        if init is None or list(init.dims) != list(codes.shape):
            raise PdqError(f"the exported graph has no initializer {name}.weight of shape {list(codes.shape)}; "
                           f"accepted: layers torch.onnx exports with their own weight")
        g.initializer.remove(init)
        width = container_bits(grid.bits, opset)
        g.initializer.extend([
            int_tensor(f"{name}.weight_quantized", codes, width, grid.signed),
            numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.weight_scale"),
            int_tensor(f"{name}.weight_zero_point", zero_point, width, grid.signed)])
        head.append(helper.make_node("DequantizeLinear", [f"{name}.weight_quantized", f"{name}.weight_scale",
                                                          f"{name}.weight_zero_point"], [f"{name}.weight"],
                                     name=f"{name}.weight_dequantize", axis=0))
    for name, (codes, scale) in (biases or {}).items():
        layer = next((n for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3
                      and n.input[1] == f"{name}.weight"), None)
        if layer is None:  # e.g. a linear exported as MatMul + Add: the runtime adds the float bias
            continue
        g.initializer.extend([int_tensor(f"{name}.bias_quantized", codes, 32, signed=True),
                              numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.bias_scale"),
                              int_tensor(f"{name}.bias_zero_point", torch.zeros_like(codes), 32, signed=True)])
        head.append(helper.make_node("DequantizeLinear", [f"{name}.bias_quantized", f"{name}.bias_scale",
                                                          f"{name}.bias_zero_point"], [f"{name}.bias_int32"],
                                     name=f"{name}.bias_dequantize", axis=0))
        layer.input[2] = f"{name}.bias_int32"
    consumers: dict[str, list] = {}
    for node in g.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    inits = {init.name: init for init in g.initializer}
    seen, nodes, after = set(), [], {}
    for node in g.node:
        if node.op_type != "QuantizeLinear":
            nodes.append(node)
            nodes.extend(after.get(id(node), []))
            continue
        tag = tag_of(inits[node.input[1]])
        users = consumers.get(node.output[0], [])
        if not 1 <= tag <= len(acts) or tag in seen or [u.op_type for u in users] != ["DequantizeLinear"]:
            raise PdqError(f"the exported graph has an unexpected QuantizeLinear ({node.name}); accepted: the graphs "
                           f"pdq's activation quantizers give")
        seen.add(tag)
        name, scale, zero_point, grid = acts[tag - 1]
        dq = users[0]
        # onnxruntime 1.32's int4 QuantizeLinear -> DequantizeLinear gave negative values for non-negative inputs
        # here (tensorrt W8A4 ResNet-20): signed activations below 8 bits are stored in int8, clipped to their grid
        width = 8 if grid.signed else container_bits(grid.bits, opset)
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale"),
                              int_tensor(f"{name}.zero_point", torch.tensor(zero_point), width, grid.signed)])
        if width != grid.bits:  # the real grid [q_min, q_max] inside the wider type: clip the dequantized value
            lo, hi = (np.float32(scale) * np.float32(q - zero_point) for q in (grid.q_min, grid.q_max))
            g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), f"{name}.clip_min"),
                                  numpy_helper.from_array(np.array(hi, np.float32), f"{name}.clip_max")])
            after[id(dq)] = [helper.make_node("Clip", [f"{name}.dequantized", f"{name}.clip_min",
                                                       f"{name}.clip_max"], [dq.output[0]], name=f"{name}.clip")]
            dq.output[0] = f"{name}.dequantized"
        node.input[1], node.input[2] = f"{name}.scale", f"{name}.zero_point"
        dq.input[1], dq.input[2] = f"{name}.scale", f"{name}.zero_point"
        node.name, dq.name = f"{name}.quantize", f"{name}.dequantize"
        nodes.append(node)
    if len(seen) != len(acts):
        missing = [acts[i - 1][0] for i in range(1, len(acts) + 1) if i not in seen]
        raise PdqError(f"the exported graph lost the activation quantizers {missing[:5]}")
    del g.node[:]
    g.node.extend(head + nodes)
    if pass_through:
        repeat_through(g)
    used = {value for node in g.node for value in node.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.value_info[:]  # the exporter's types of the retyped values; shape inference gives them again
    return model


def repeat_through(g) -> None:
    """After each pass-through op (`PASS_THROUGH_OPS`) whose data input is a DequantizeLinear's output and which
    feeds something other than a QuantizeLinear, the same Q/DQ pair again (same scale and zero point)."""
    from onnx import helper

    producer = {out: node for node in g.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in g.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    nodes = []
    for node in g.node:
        nodes.append(node)
        dq = producer.get(node.input[0]) if node.input else None
        users = consumers.get(node.output[0], []) if node.output else []
        if (node.op_type not in PASS_THROUGH_OPS or dq is None or dq.op_type != "DequantizeLinear"
                or not users or all(u.op_type == "QuantizeLinear" for u in users)):
            continue
        value = node.output[0]
        scale, zero_point = dq.input[1], dq.input[2]
        q = helper.make_node("QuantizeLinear", [f"{value}.pass", scale, zero_point], [f"{value}.pass_quantized"],
                             name=f"{node.name}.quantize")
        d = helper.make_node("DequantizeLinear", [f"{value}.pass_quantized", scale, zero_point], [value],
                             name=f"{node.name}.dequantize")
        node.output[0] = f"{value}.pass"
        nodes += [q, d]
        producer[value] = d  # a chain (reshape after max pooling) repeats it again
    del g.node[:]
    g.node.extend(nodes)
