"""ONNX QDQ export of a finished run (`pdq-export RUN_DIR --format onnx [--opset N]`, `export=onnx`).

1. `pdq.load` rebuilds the run's quantized graph from its integer checkpoint (with its backend's quantizers).
2. `torch.onnx.export` (the dynamo exporter) exports a copy in which each weight is its dequantized value, each
   bias the value the layer adds (under a runtime backend its int32-grid value), and each activation quantizer a
   uint8 QuantizeLinear/DequantizeLinear pair whose scale tags the quantizer.
3. The graph is then given the real grids, which the exporter cannot express below 8 bits:
   * each quantized weight becomes an integer initialiser of its own type (int2/uint2 from opset 25, int4/uint4
     from opset 21, else int8/uint8; signed for the runtime backends' symmetric grids) feeding a per-channel
     `DequantizeLinear` (axis 0);
   * each activation pair gets its quantizer's scale and zero point, with a zero point of the same types;
   * a width with no type of its own at the opset (3 bits; 2 bits below opset 25; 2-4 bits below 21), and a
     signed activation grid below 8 bits (onnxruntime 1.32 ran int4 activation Q/DQ wrongly in pdq's tests),
     is stored in the next wider type (int8 for those activations); an activation's dequantized value then
     passes a `Clip` to its real grid (after `DequantizeLinear`: onnxruntime cannot fuse a Clip into a 4-bit
     QuantizeLinear), and a weight's codes lie on the real grid already;
   * under the onnxruntime backend each bias on the int32 grid becomes int32 codes with a per-channel
     `DequantizeLinear` at s_in * s_w (what QLinearConv and QGemm take);
   * under a runtime backend, a max pooling, flatten or reshape whose input is dequantized gets the same
     quantizer again after it, so that the runtime moves the integers through it and the next layer reads a
     `DequantizeLinear` (the same values: these ops keep codes on their grid).
4. `onnx.checker` with full shape inference checks the result, which is written atomically; with it goes the
   fusion audit (`pdq.export.audit`): what onnxruntime's optimiser made of the graph."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from pdq.errors import PdqError, cause
from pdq.export.checkpoint import load_with_meta, unsigned_codes, weight_codes
from pdq.export.pack import pack
from pdq.io import atomic_write
from pdq.quant.backends import get_backend
from pdq.quant.fold import _set_submodule
from pdq.quant.functional import to_codes
from pdq.quant.graph import act_quant_names, backend_of, quant_layer_names, stem_and_head
from pdq.quant.modules import INT32
from pdq.quant.quantizers import FP_BITS, FakeQuantizer

ONNX_FILE = "quantized_model.onnx"
#: per-channel DequantizeLinear (axis) needs 13; the widest types pdq uses (uint2) need 25
MIN_OPSET, MAX_OPSET = 13, 25
#: the opset torch's exporter writes; lower ones are reached with onnx's version converter
EXPORTER_MIN_OPSET = 18
#: the exporter's INFO lines (one per pass and deduplicated initializer), quietened while it runs
QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")
log = logging.getLogger("pdq")


def container_bits(bits: int, opset: int) -> int:
    """The width of the ONNX integer type that holds `bits`-bit codes at `opset`."""
    if bits <= 2 and opset >= 25:
        return 2
    if bits <= 4 and opset >= 21:
        return 4
    return 8


def default_opset(widths: set[int]) -> int:
    """The lowest opset (from the exporter's own) at which every width has its own type or uses the next wider."""
    if any(b <= 2 for b in widths):
        return 25
    if any(b <= 4 for b in widths):
        return 21
    return EXPORTER_MIN_OPSET


def check_opset(opset) -> int | None:
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise PdqError(f"opset={opset!r} is not accepted; accepted: {MIN_OPSET}..{MAX_OPSET} (per-channel "
                       f"DequantizeLinear needs {MIN_OPSET}; 4-bit types need 21, 2-bit types 25; below those a width "
                       f"is stored in uint8 with a Clip), or null for the lowest opset with every width's own type")
    return opset


#: ops whose output keeps the integer codes of their input (onnxruntime moves int8/uint8 through them)
PASS_THROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze")


def _tensor_type(bits: int, signed: bool = False):
    from onnx import TensorProto

    if signed:
        return {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8, 32: TensorProto.INT32}[bits]
    return {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}[bits]


def _int_tensor(name: str, codes: torch.Tensor, width: int, signed: bool = False):
    """An initializer of type (u)int`width` holding `codes` (signed ones in two's complement), packed as ONNX packs
    2- and 4-bit types (raw data, the lowest bits first: `pdq.export.pack`'s layout)."""
    from onnx import helper, numpy_helper

    if width == 32:
        return numpy_helper.from_array(codes.to(torch.int32).numpy(), name)
    raw = bytes(pack(unsigned_codes(codes, width) if signed else codes, width).numpy())
    return helper.make_tensor(name, _tensor_type(width, signed), list(codes.shape), raw, raw=True)


class _QDQ(nn.Module):
    """An activation quantizer's place in the exported graph: a uint8 Q/DQ pair whose scale is its tag (in the
    ops each exporter maps to QuantizeLinear/DequantizeLinear)."""

    def __init__(self, tag: int, legacy: bool):
        super().__init__()
        self.tag, self.legacy = float(tag), legacy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.legacy:
            return torch.fake_quantize_per_tensor_affine(x, self.tag, 0, 0, 255)
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, self.tag, 0, 0, 255, torch.uint8)
        return ops.dequantize_per_tensor(q, self.tag, 0, 0, 255, torch.uint8)


def deploy_copy(gm: fx.GraphModule, legacy: bool = False) -> tuple[fx.GraphModule, dict, list, dict]:
    """(a copy of `gm` with dequantized weights, the biases it adds and tagged Q/DQ activation placeholders,
    {layer: (codes, scale, zero point, grid)} of the quantized weights, [(name, scale, zero point, grid)] of the
    activation quantizers in tag order, {layer: (int32 codes, scale)} of the biases on the int32 grid)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    d = copy.deepcopy(gm).eval()
    weights, acts, biases = {}, [], {}
    for name in quant_layer_names(d):
        layer = d.get_submodule(name)
        wq = layer.weight_quant
        with torch.no_grad():
            if wq.bits < FP_BITS:
                weights[name] = (weight_codes(layer), wq.scale.detach().float().clone(),
                                 wq.zero_point.detach().long(), wq.grid)
            bias_scale = layer.bias_scale()
            if bias_scale is not None:
                codes = to_codes(layer.bias.detach(), bias_scale, torch.zeros_like(bias_scale), INT32)
                biases[name] = (codes.long(), bias_scale.float().clone())
                layer.bias = nn.Parameter(layer.quantized_bias(), requires_grad=False)
            layer.weight = nn.Parameter(wq(layer.weight), requires_grad=False)
        layer.weight_quant = nn.Identity()
        layer.link_bias(None)
    for name in act_quant_names(d):
        aq = d.get_submodule(name)
        if aq.bits < FP_BITS:
            acts.append((name, float(aq.scale), int(aq.zero_point), aq.grid))
            _set_submodule(d, name, _QDQ(len(acts), legacy))
        else:
            _set_submodule(d, name, nn.Identity())
    return d, weights, acts, biases


def torch_export(d: fx.GraphModule, input_shape: list[int], opset: int):
    """The exporter's ModelProto of `d` (batch dimension dynamic), at `opset`: torch's dynamo exporter from
    its own opset on, its TorchScript exporter below (onnx's version converter has no down-conversions)."""
    import onnx

    x = torch.zeros(2, *input_shape)
    names = {"input_names": ["input"], "output_names": ["logits"], "verbose": False}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet():
            warnings.simplefilter("ignore")
            if opset >= EXPORTER_MIN_OPSET:
                return torch.onnx.export(d, (x,), dynamo=True, opset_version=opset, **names,
                                         dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
            f = io.BytesIO()
            torch.onnx.export(d, (x,), f, dynamo=False, opset_version=opset, **names,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return _constants_as_initializers(onnx.load_from_string(f.getvalue()))
    except Exception as e:
        raise PdqError(f"the model cannot be expressed in ONNX: torch.onnx.export failed: {_export_cause(e)}; "
                       f"accepted: models whose operators torch.onnx exports") from None


def _constants_as_initializers(model):
    """The TorchScript exporter's Constant nodes (tensor values) as initializers, as the dynamo exporter has them."""
    g = model.graph
    for node in [n for n in g.node if n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"]]:
        tensor = node.attribute[0].t
        tensor.name = node.output[0]
        g.initializer.append(tensor)
        g.node.remove(node)
    return model


@contextlib.contextmanager
def _quiet():
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _export_cause(e: BaseException) -> str:
    """The operator an exporter failure names, else its first line."""
    text = str(e)
    op = re.search(r"op='([^']+)'", text) or re.search(r"target=torch\.ops\.([\w.]+)", text)
    if op:
        return f"no ONNX function for the operator {op.group(1)}"
    return cause(e, 300)


def qdq_surgery(model, weights: dict, acts: list, opset: int, biases: dict | None = None,
                pass_through: bool = False):
    """Give the exported graph pdq's integer weights, activation grids and (`biases`) int32 biases, and with
    `pass_through` repeat a quantizer after the ops that keep its codes (see the module docstring)."""
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
            _int_tensor(f"{name}.weight_quantized", codes, width, grid.signed),
            numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.weight_scale"),
            _int_tensor(f"{name}.weight_zero_point", zero_point, width, grid.signed)])
        head.append(helper.make_node("DequantizeLinear", [f"{name}.weight_quantized", f"{name}.weight_scale",
                                                          f"{name}.weight_zero_point"], [f"{name}.weight"],
                                     name=f"{name}.weight_dequantize", axis=0))
    for name, (codes, scale) in (biases or {}).items():
        layer = next((n for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3
                      and n.input[1] == f"{name}.weight"), None)
        if layer is None:  # e.g. a linear exported as MatMul + Add: the runtime adds the float bias
            continue
        g.initializer.extend([_int_tensor(f"{name}.bias_quantized", codes, 32, signed=True),
                              numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.bias_scale"),
                              _int_tensor(f"{name}.bias_zero_point", torch.zeros_like(codes), 32, signed=True)])
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
        tag = int(round(float(numpy_helper.to_array(inits[node.input[1]]))))
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
                              _int_tensor(f"{name}.zero_point", torch.tensor(zero_point), width, grid.signed)])
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
        _repeat_through(g)
    used = {value for node in g.node for value in node.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.value_info[:]  # the exporter's types of the retyped values; shape inference gives them again
    return model


def _repeat_through(g) -> None:
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


def check(model) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise PdqError(f"the exported graph fails onnx.checker ({cause(e, 400)})") from None


def build_qdq(gm: fx.GraphModule, input_shape: list[int], opset: int):
    """The checked ONNX QDQ ModelProto of the quantized graph `gm` at `opset`."""
    d, weights, acts, biases = deploy_copy(gm, legacy=opset < EXPORTER_MIN_OPSET)
    backend = get_backend(backend_of(gm))
    model = qdq_surgery(torch_export(d, input_shape, opset), weights, acts, opset,
                        biases=biases if backend.bias_codes_in_graph else None, pass_through=backend.runtime)
    check(model)
    return model


def widths(meta: dict) -> set[int]:
    return {s["bits"] for s in meta["weights"].values() if s["bits"] < FP_BITS} | {
        b for b in meta["acts"].values() if b < FP_BITS}


def export_onnx(path: str | Path, out: str | Path | None = None, opset: int | None = None,
                model: nn.Module | None = None) -> Path:
    """Write the ONNX QDQ model of a finished run (its dir, or its integer checkpoint) to `out` (default: the
    run dir's quantized_model.onnx); `opset` None: `default_opset` of the run's widths; `model`: the float
    architecture, for a run whose model was given as a Python object (as for `pdq.load`)."""
    opset = check_opset(opset)
    gm, meta = load_with_meta(path, model=model)
    opset = opset if opset is not None else default_opset(widths(meta))
    model = build_qdq(gm, meta["input_shape"], opset)
    run_dir = Path(path).expanduser()
    out = Path(out).expanduser() if out is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / ONNX_FILE
    atomic_write(out, model.SerializeToString())
    log.info("wrote %s (opset %d, %.1f KiB)", out, opset, out.stat().st_size / 1024)
    write_fusion_audit(out)
    return out


def write_fusion_audit(path: Path) -> dict:
    """The fusion audit of an exported file (`pdq.export.audit`), logged and written next to it; a graph that
    onnxruntime cannot optimise is named in the audit and the log (the export stands: it is checked)."""
    from pdq.export.audit import audit, format_audit, write_audit

    try:
        report = audit(path, disabled_optimizers=disabled_optimizers(path))
    except PdqError as e:
        report = {"model": str(path), "error": str(e)}
        log.warning("fusion audit: %s", e)
    else:
        log.info("%s", format_audit(report))
    write_audit(report, path)
    return report


class OnnxExport:
    """`export=onnx`: the run exports its model to ONNX at its end. `check` tries the export on the quantized
    graph before any heavy work, so that a model ONNX cannot express stops the run at once."""

    def __init__(self, opset: int | None = None):
        self.opset = check_opset(opset)

    def check(self, gm: fx.GraphModule, input_shape: list[int], table: dict) -> None:
        widths_used = {b for side in table.values() for b in side.values() if b < FP_BITS}
        opset = self.opset if self.opset is not None else default_opset(widths_used)
        trial = copy.deepcopy(gm)
        for module in trial.modules():  # uncalibrated quantizers: their grids do not matter to the trial
            if isinstance(module, FakeQuantizer):
                module.initialized.fill_(True)
        torch_export(deploy_copy(trial, legacy=opset < EXPORTER_MIN_OPSET)[0], input_shape, opset)

    def __call__(self, run_dir: str | Path, model: nn.Module | None = None) -> Path:
        return export_onnx(run_dir, opset=self.opset, model=model)


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


def head_step(gm: fx.GraphModule) -> float:
    """How far one quantization step of every element of the classifier's input can move a logit:
    s_in * max_j sum_i |W_ji| (the unit of the parity tolerance)."""
    _, _, last, last_in = stem_and_head(gm)
    fc = gm.get_submodule(last)
    return float(gm.get_submodule(last_in).scale) * fc.weight_quant(fc.weight).abs().sum(1).max().item()


def onnx_logits(sess, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: images[i:i + batch_size].numpy()})[0])
                      for i in range(0, len(images), batch_size)])
