"""ONNX QDQ export of a finished run (`pdq export RUN_DIR --format onnx [--opset N]`, `export=onnx`): build and write.

1. `pdq.load` rebuilds the run's quantized graph from its integer checkpoint (with its backend's quantizers).
2. `torch.onnx.export` (the dynamo exporter) exports the deploy copy (`deploy_copy`), in which each weight is its
   dequantized value, each bias the value the layer adds (under a runtime backend its int32-grid value), and each
   activation quantizer a uint8 QuantizeLinear/DequantizeLinear pair whose scale tags the quantizer
   (`pdq.export.qdq.tag_scale`).
3. QDQ graph surgery (`pdq.export.qdq`) then gives the graph the real grids, which the exporter cannot express below
   8 bits: integer weights of their own ONNX types, each activation's scale and zero point, a Clip where a width has
   no type of its own, int32 biases, and quantizers repeated through the ops that keep codes.
4. `onnx.checker` with full shape inference checks the result, which is written atomically; with it goes the
   fusion audit (`pdq.export.audit`): what onnxruntime's optimiser made of the graph.

The opset policy (`default_opset`, `check_opset`) is here; onnxruntime sessions of the result are
`pdq.export.runtime`, and the parity helpers of the tests and benchmarks `pdq.export.parity`."""

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
from pdq.export.qdq import OWN_TYPE_OPSET, qdq_surgery, tag_scale
from pdq.export.runtime import disabled_optimizers
from pdq.io import atomic_write
from pdq.quant.backends import get_backend
from pdq.quant.functional import to_codes
from pdq.quant.graph import act_quant_names, backend_of, quant_layer_names
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


def default_opset(widths: set[int]) -> int:
    """The lowest opset (from the exporter's own) at which every width has its own type or uses the next wider
    (`pdq.export.qdq.OWN_TYPE_OPSET`)."""
    needed = [first for width, first in OWN_TYPE_OPSET.items() if any(b <= width for b in widths)]
    return max([EXPORTER_MIN_OPSET, *needed])


def check_opset(opset) -> int | None:
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise PdqError(f"opset={opset!r} is not accepted; accepted: {MIN_OPSET}..{MAX_OPSET} (per-channel "
                       f"DequantizeLinear needs {MIN_OPSET}; 4-bit types need 21, 2-bit types 25; below those a width "
                       f"is stored in uint8 with a Clip), or null for the lowest opset with every width's own type")
    return opset


def quantized_decomposed():
    """torch.ops.quantized_decomposed, the ops the deploy copy's Q/DQ pairs are made of for torch's dynamo exporter
    (which writes them as QuantizeLinear/DequantizeLinear). They are registered by importing a private torch module:
    this is the one place export touches it, and a torch without it is one clear error."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

        ops = torch.ops.quantized_decomposed
        ops.quantize_per_tensor, ops.dequantize_per_tensor  # noqa: B018  (both registered)
    except (ImportError, AttributeError, RuntimeError) as e:
        raise PdqError(f"ONNX export needs torch.ops.quantized_decomposed (registered by torch's private module "
                       f"torch.ao.quantization.fx._decomposed), which this torch {torch.__version__} does not have "
                       f"({type(e).__name__}: {e}); accepted: the torch version pdq pins (setup.cfg), or opset="
                       f"{MIN_OPSET}..{EXPORTER_MIN_OPSET - 1} (TorchScript exporter)") from None
    return ops


class _QDQ(nn.Module):
    """An activation quantizer's place in the deploy copy: a uint8 Q/DQ pair (in the ops each exporter maps to
    QuantizeLinear/DequantizeLinear) whose scale is the quantizer's tag, `pdq.export.qdq.tag_scale(index)`, not a
    scale: QDQ surgery finds the quantizer by it and writes the real scale and zero point."""

    def __init__(self, index: int, legacy: bool):
        super().__init__()
        self.tag, self.legacy = tag_scale(index), legacy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.legacy:
            return torch.fake_quantize_per_tensor_affine(x, self.tag, 0, 0, 255)
        ops = torch.ops.quantized_decomposed  # registered by `deploy_copy` (`quantized_decomposed`)
        q = ops.quantize_per_tensor(x, self.tag, 0, 0, 255, torch.uint8)
        return ops.dequantize_per_tensor(q, self.tag, 0, 0, 255, torch.uint8)


def deploy_copy(gm: fx.GraphModule, legacy: bool = False) -> tuple[fx.GraphModule, dict, list, dict]:
    """(a copy of `gm` with dequantized weights, the biases it adds and tagged Q/DQ activation placeholders,
    {layer: (codes, scale, zero point, grid)} of the quantized weights, [(name, scale, zero point, grid)] of the
    activation quantizers in tag order (the quantizer at index i, from 1, is tagged `tag_scale(i)`), {layer: (int32
    codes, scale)} of the biases on the int32 grid). `legacy`: for the TorchScript exporter (below opset 18)."""
    if not legacy:
        quantized_decomposed()
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
            d.set_submodule(name, _QDQ(len(acts), legacy))
        else:
            d.set_submodule(name, nn.Identity())
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
