"""ONNX QDQ export of a finished run (`pdq-export RUN_DIR --format onnx [--opset N]`, `export=onnx`).

1. `pdq.load` rebuilds the run's quantized graph from its integer checkpoint.
2. `torch.onnx.export` (the dynamo exporter) exports a copy in which each weight is its dequantized value and
   each activation quantizer a uint8 QuantizeLinear/DequantizeLinear pair whose scale tags the quantizer.
3. The graph is then given the real grids, which the exporter cannot express below 8 bits:
   * each quantized weight becomes an integer initialiser of its own type (uint2 from opset 25, uint4 from
     opset 21, else uint8) feeding a per-channel `DequantizeLinear` (axis 0);
   * each activation pair gets its quantizer's scale and zero point, with a zero point of the same types;
   * a width with no type of its own at the opset (3 bits; 2 bits below opset 25; 2-4 bits below 21) is
     stored in the next wider type; an activation's dequantized value then passes a `Clip` to its real grid
     (after `DequantizeLinear`: onnxruntime cannot fuse a Clip into a 4-bit QuantizeLinear), and a weight's
     codes lie on the real grid already.
   pdq's grid is unsigned (codes 0..2^b-1, a zero point per channel or tensor), so the types are unsigned.
4. `onnx.checker` with full shape inference checks the result, which is written atomically."""

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
from pdq.export.checkpoint import load_with_meta, weight_codes
from pdq.export.pack import pack
from pdq.io import atomic_write
from pdq.quant.fold import _set_submodule
from pdq.quant.graph import act_quant_names, quant_layer_names, stem_and_head
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


def _tensor_type(bits: int):
    from onnx import TensorProto

    return {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}[bits]


def _int_tensor(name: str, codes: torch.Tensor, width: int):
    """An initializer of type uint`width` holding `codes`, packed as ONNX packs 2- and 4-bit types (raw data, the
    lowest bits first: `pdq.export.pack`'s layout)."""
    from onnx import helper

    return helper.make_tensor(name, _tensor_type(width), list(codes.shape), bytes(pack(codes, width).numpy()),
                              raw=True)


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


def deploy_copy(gm: fx.GraphModule, legacy: bool = False) -> tuple[fx.GraphModule, dict, list]:
    """(a copy of `gm` with dequantized weights and tagged Q/DQ activation placeholders, {layer: (codes, scale,
    zero point, bits)} of the quantized weights, [(name, scale, zero point, bits)] of the activation
    quantizers, in tag order)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    d = copy.deepcopy(gm).eval()
    weights, acts = {}, []
    for name in quant_layer_names(d):
        layer = d.get_submodule(name)
        wq = layer.weight_quant
        with torch.no_grad():
            if wq.bits < FP_BITS:
                weights[name] = (weight_codes(layer).to(torch.uint8), wq.scale.detach().float().clone(),
                                 wq.zero_point.detach().to(torch.uint8), wq.bits)
            layer.weight = nn.Parameter(wq(layer.weight), requires_grad=False)
        layer.weight_quant = nn.Identity()
    for name in act_quant_names(d):
        aq = d.get_submodule(name)
        if aq.bits < FP_BITS:
            acts.append((name, float(aq.scale), int(aq.zero_point), aq.bits))
            _set_submodule(d, name, _QDQ(len(acts), legacy))
        else:
            _set_submodule(d, name, nn.Identity())
    return d, weights, acts


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


def qdq_surgery(model, weights: dict, acts: list, opset: int):
    """Give the exported graph pdq's integer weights and activation grids (see the module docstring)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {init.name: init for init in g.initializer}
    head = []
    for name, (codes, scale, zero_point, bits) in weights.items():
        init = inits.get(f"{name}.weight")
        if init is None or list(init.dims) != list(codes.shape):
            raise PdqError(f"the exported graph has no initializer {name}.weight of shape {list(codes.shape)}; "
                           f"accepted: layers torch.onnx exports with their own weight")
        g.initializer.remove(init)
        width = container_bits(bits, opset)
        g.initializer.extend([
            _int_tensor(f"{name}.weight_quantized", codes, width),
            numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.weight_scale"),
            _int_tensor(f"{name}.weight_zero_point", zero_point, width)])
        head.append(helper.make_node("DequantizeLinear", [f"{name}.weight_quantized", f"{name}.weight_scale",
                                                          f"{name}.weight_zero_point"], [f"{name}.weight"],
                                     name=f"{name}.weight_dequantize", axis=0))
    consumers: dict[str, list] = {}
    for node in g.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    inits = {init.name: init for init in g.initializer}
    seen, nodes, clips = set(), [], {}
    for node in g.node:
        if node.op_type != "QuantizeLinear":
            nodes.append(node)
            if id(node) in clips:
                nodes.append(clips[id(node)])
            continue
        tag = int(round(float(numpy_helper.to_array(inits[node.input[1]]))))
        users = consumers.get(node.output[0], [])
        if not 1 <= tag <= len(acts) or tag in seen or [u.op_type for u in users] != ["DequantizeLinear"]:
            raise PdqError(f"the exported graph has an unexpected QuantizeLinear ({node.name}); accepted: the graphs "
                           f"pdq's activation quantizers give")
        seen.add(tag)
        name, scale, zero_point, bits = acts[tag - 1]
        dq = users[0]
        width = container_bits(bits, opset)
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale"),
                              _int_tensor(f"{name}.zero_point", torch.tensor(zero_point), width)])
        if width != bits:  # the real grid [0, 2^bits - 1] inside the wider type: clip the dequantized value
            lo, hi = (np.float32(scale) * np.float32(q - zero_point) for q in (0, 2 ** bits - 1))
            g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), f"{name}.clip_min"),
                                  numpy_helper.from_array(np.array(hi, np.float32), f"{name}.clip_max")])
            clips[id(dq)] = helper.make_node("Clip", [f"{name}.dequantized", f"{name}.clip_min", f"{name}.clip_max"],
                                             [dq.output[0]], name=f"{name}.clip")
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
    used = {value for node in g.node for value in node.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.value_info[:]  # the exporter's types of the retyped values; shape inference gives them again
    return model


def check(model) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise PdqError(f"the exported graph fails onnx.checker ({cause(e, 400)})") from None


def build_qdq(gm: fx.GraphModule, input_shape: list[int], opset: int):
    """The checked ONNX QDQ ModelProto of the quantized graph `gm` at `opset`."""
    d, weights, acts = deploy_copy(gm, legacy=opset < EXPORTER_MIN_OPSET)
    model = qdq_surgery(torch_export(d, input_shape, opset), weights, acts, opset)
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
    return out


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
    that rule (ClipQuantRewrite) is turned off in both modes (it only drops a Clip the grid makes redundant)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not fuse:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ClipQuantRewrite"])


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
