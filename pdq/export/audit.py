"""Fusion audit of an exported ONNX QDQ model: what onnxruntime actually runs in integer arithmetic.

A QDQ model only says where values are quantized; onnxruntime's graph optimizer decides what runs on integers by
fusing each `DequantizeLinear -> op -> QuantizeLinear` group into an integer kernel (QLinearConv, QLinearAdd, QGemm,
...). A group it cannot fuse stays a float op between a DequantizeLinear and a QuantizeLinear, which costs time and
is easy to miss. `audit` has onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL) optimize the model, saves the
optimized graph (`<stem>.optimized.onnx` next to the model unless told otherwise) and counts in it:

* `op_counts`: every op type;
* `integer`: the integer ops (op types starting with QLinear / NhwcQLinear, QGemm, MatMulInteger, ConvInteger,
  DynamicQuantizeMatMul, MatMulIntegerToFloat), plus a compute op whose first input is 8-bit, counted as e.g.
  `MaxPool(uint8)`: onnxruntime runs a MaxPool between a DequantizeLinear and a QuantizeLinear on the 8-bit values
  themselves (as `MaxPool`, or `NhwcMaxPool` inside an NHWC region);
* `float_ops`: the compute ops that stayed float (op types containing Conv, Gemm, MatMul or Pool, and Add, Sum,
  ReduceMean), including onnxruntime's fused float kernels (FusedConv, the NCHWc `Conv` of domain
  com.microsoft.nchwc, FusedGemm, FusedMatMul); `fused_add` marks a float convolution that absorbed a residual Add,
  `source` names the original node it came from;
* `weight_dequantize`: DequantizeLinear nodes of a constant (a weight dequantized at run time, i.e. not fused);
* `transposes`: every Transpose. onnxruntime runs integer convolutions in NHWC and puts a Transpose at each edge of
  an NHWC region; one before the first or after the last convolution of the network (no convolution between it and
  a graph input, or none between it and a graph output) is `at_end`, a one-off layout change. An inner Transpose
  (convolutions on both sides) means a region was cut, most often by a float op between integer ones.

`explanations` gives one line per float op with the most likely reason it stayed float, read from the original
graph: the op is traced back to the original node (same name or output, through activations onnxruntime fused into
it) and its neighbours are checked (a DequantizeLinear before it, a QuantizeLinear after it, 8-bit types)."""

from __future__ import annotations

import re
from collections import Counter, deque
from pathlib import Path

from pdq.errors import PdqError, cause
from pdq.io import atomic_write_json

INTEGER_OPS = {"QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
#: ops onnxruntime (CPU) fuses with the DequantizeLinear before and the QuantizeLinear after them (found by trying)
QDQ_FUSED = {"Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat"}
#: ops whose output has their (first) input's element type
SAME_TYPE = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "NhwcMaxPool",
             "GlobalMaxPool", "Slice", "Pad", "Resize", "Split", "Concat"}
#: ops onnxruntime may fold into the compute op before them (followed back to find a fused op's original node)
FOLDED = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization", "Add",
          "QuantizeLinear", "DequantizeLinear"}


def _is_integer_op(op: str) -> bool:
    return op.startswith(("QLinear", "NhwcQLinear")) or op in INTEGER_OPS


def _kind(op: str) -> str | None:
    """conv | gemm | matmul | pool | add for a compute op type, None for anything else."""
    for word, kind in (("Conv", "conv"), ("Gemm", "gemm"), ("MatMul", "matmul"), ("Pool", "pool")):
        if word in op:
            return kind
    return {"Add": "add", "Sum": "add", "ReduceMean": "pool"}.get(op)


def _low_bit_types() -> set[int]:
    from onnx import TensorProto

    return {getattr(TensorProto, t) for t in ("UINT4", "INT4", "UINT2", "INT2") if hasattr(TensorProto, t)}


class _Graph:
    """Producers, consumers, constants and (where they can be told) element types of a graph's tensors."""

    def __init__(self, graph):
        from onnx import TensorProto

        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes if n.name}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {t.name for t in graph.initializer} | {
            o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        self.types.update({t.name: t.data_type for t in graph.initializer})
        for n in self.nodes:  # graphs are topologically sorted; a known producer overrides (stale) value_info
            if not n.output:
                continue
            if n.op_type == "QuantizeLinear":
                zero = n.input[2] if len(n.input) > 2 else ""
                self.types[n.output[0]] = self.types.get(zero, TensorProto.UINT8) if zero else TensorProto.UINT8
            elif n.op_type == "DequantizeLinear":
                self.types[n.output[0]] = TensorProto.FLOAT
            elif _is_integer_op(n.op_type) and n.op_type.startswith(("QLinear", "NhwcQLinear", "QGemm")):
                first = self.types.get(n.input[0]) if n.op_type != "QLinearConcat" else None  # x or a's type
                self.types[n.output[0]] = first if first in (TensorProto.UINT8, TensorProto.INT8) else TensorProto.UINT8
            elif n.op_type in SAME_TYPE and n.input and n.input[0] in self.types:
                for o in n.output:
                    self.types[o] = self.types[n.input[0]]

    def int8(self, name: str) -> str | None:
        """'uint8' / 'int8' if `name` is an 8-bit integer tensor, else None."""
        from onnx import TensorProto

        return {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}.get(self.types.get(name, 0))

    def reached(self, start, forward: bool) -> set[int]:
        """ids of the nodes downstream (forward) or upstream of any node in `start`, not counting `start` itself."""
        seen: set[int] = set()
        todo = deque(start)
        while todo:
            n = todo.popleft()
            nxt = ([c for o in n.output for c in self.consumers.get(o, [])] if forward
                   else [self.producer[i] for i in n.input if i in self.producer])
            for m in nxt:
                if id(m) not in seen:
                    seen.add(id(m))
                    todo.append(m)
        return seen


def _original_node(node, original: _Graph):
    """The node of the original graph that `node` (optimized) came from, or None."""
    def family(op: str) -> str | None:  # onnxruntime turns MatMul + Add into Gemm
        return {"gemm": "matmul"}.get(_kind(op), _kind(op))

    stripped = re.sub(r"(_token_\d+|_nchwc)+$", "", node.name)
    for name in (node.name, stripped, *node.output):
        cand = original.by_name.get(name) or original.producer.get(name)
        for _ in range(4):  # back through an activation / BatchNorm / residual Add fused into the op
            if cand is None or family(cand.op_type) == family(node.op_type):
                break
            cand = original.producer.get(cand.input[0]) if cand.op_type in FOLDED and cand.input else None
        if cand is not None and family(cand.op_type) == family(node.op_type):
            return cand
    return None


def _reason(node, original: _Graph) -> str:
    """Why the original `node` most likely was not fused into an integer kernel."""
    weighted = _kind(node.op_type) in ("conv", "gemm", "matmul") and len(node.input) > 1
    activations = [i for i in (node.input[:1] if weighted else node.input) if i and i not in original.constants]
    dqs = [original.producer.get(i) for i in activations]
    if any(dq is None or dq.op_type != "DequantizeLinear" for dq in dqs):
        return "its input is not a DequantizeLinear output (no quantizer before it)"
    if node.op_type not in QDQ_FUSED:
        return f"onnxruntime has no QDQ fusion for {node.op_type}"
    low = _low_bit_types()
    if any(original.types.get(dq.input[0]) in low for dq in dqs):
        return "its input is quantized below 8 bits"
    if weighted and node.input[1] not in original.constants:
        weight_dq = original.producer.get(node.input[1])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            return "its weight is not a DequantizeLinear output (weight not quantized)"
        if original.types.get(weight_dq.input[0]) in low:
            return "its weight is quantized below 8 bits"
    elif weighted:
        return "its weight is a float constant (weight not quantized)"

    def users(nodes):
        return [c for n in nodes for o in n.output for c in original.consumers.get(o, [])]

    after = users([node])
    after += users([a for a in after if a.op_type in ("Relu", "Clip")])  # an activation is folded into the Q
    if not any(c.op_type == "QuantizeLinear" for c in after):
        return "no QuantizeLinear after it"
    return "unknown"


def _load(path: Path, what: str):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise PdqError(f"{what} {path} could not be read as ONNX ({cause(e)})") from None


def audit(path: str | Path, *, threads: int | None = 1, optimized_path: str | Path | None = None,
          disabled_optimizers: list[str] = ()) -> dict:
    """Optimize the ONNX model at `path` with onnxruntime and count what runs on integers (module docstring)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise PdqError(f"ONNX model {path} not found (no such file)")
    optimized = Path(optimized_path) if optimized_path is not None else path.with_name(f"{path.stem}.optimized.onnx")
    if optimized.resolve() == path.resolve():
        raise PdqError(f"optimized_path={str(optimized)!r} would overwrite the model it is made from")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # not the warning that an NCHWc-optimized model is specific to this machine
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled_optimizers))
    except Exception as e:
        raise PdqError(f"onnxruntime could not load the ONNX model {path} ({cause(e)})") from None
    original, graph = _Graph(_load(path, "ONNX model").graph), _Graph(_load(optimized, "optimized model").graph)

    integer: Counter = Counter()
    float_ops, explanations = [], []
    for n in graph.nodes:
        kind = _kind(n.op_type)
        if _is_integer_op(n.op_type):
            integer[n.op_type] += 1
        elif kind and n.input and graph.int8(n.input[0]):
            integer[f"{n.op_type}({graph.int8(n.input[0])})"] += 1
        elif kind:
            fused_add = kind == "conv" and len(n.input) > 3 and bool(n.input[3])  # FusedConv's Z, NCHWc Conv's Sum
            source = _original_node(n, original)
            float_ops.append({"op": n.op_type, "name": n.name, "kind": kind, "fused_add": fused_add,
                              "source": source.name if source is not None else None})
            origin = f", from {source.op_type} {source.name}" if source is not None and source.name != n.name else ""
            reason = _reason(source, original) if source is not None else "unknown"
            explanations.append(f"{n.op_type} {n.name} ({kind}{' with a fused Add' if fused_add else ''}{origin}): "
                                f"{reason}")
    weight_dq = [n.name for n in graph.nodes if n.op_type == "DequantizeLinear" and n.input[0] in graph.constants]

    convs = [n for n in graph.nodes if "Conv" in n.op_type]
    after_conv, before_conv = graph.reached(convs, forward=True), graph.reached(convs, forward=False)
    transposes = [{"name": n.name, "at_end": id(n) not in after_conv or id(n) not in before_conv}
                  for n in graph.nodes if n.op_type == "Transpose"]
    return {
        "model": str(path),
        "optimized_model": str(optimized),
        "onnxruntime": ort.__version__,
        "op_counts": dict(Counter(n.op_type for n in graph.nodes).most_common()),
        "integer": dict(integer.most_common()),
        "float_ops": float_ops,
        "weight_dequantize": weight_dq,
        "transposes": transposes,
        "summary": {"integer": sum(integer.values()), "float": len(float_ops), "weight_dequantize": len(weight_dq),
                    "transposes": len(transposes), "inner_transposes": sum(not t["at_end"] for t in transposes)},
        "explanations": explanations,
    }


def format_audit(report: dict, max_explanations: int = 5) -> str:
    """A few lines: the counts, then the first `max_explanations` float ops and why they stayed float."""
    s = report["summary"]

    def listing(counts: dict) -> str:
        return f" ({', '.join(f'{op} {k}' for op, k in counts.items())})" if counts else ""

    floats = Counter(f["op"] for f in report["float_ops"])
    lines = [f"fusion audit of {report['model']} (onnxruntime {report['onnxruntime']})",
             f"integer ops: {s['integer']}{listing(report['integer'])}",
             f"float compute ops: {s['float']}{listing(dict(floats.most_common()))}",
             f"weights dequantized at run time: {s['weight_dequantize']}",
             f"transposes: {s['transposes']} ({s['inner_transposes']} inner)"]
    lines += [f"  {e}" for e in report["explanations"][:max_explanations]]
    if len(report["explanations"]) > max_explanations:
        lines.append(f"  ... and {len(report['explanations']) - max_explanations} more float ops")
    return "\n".join(lines)


def write_audit(report: dict, onnx_path: str | Path) -> Path:
    """Write `report` as `<onnx stem>.audit.json` next to the ONNX file (atomically); returns its path."""
    onnx_path = Path(onnx_path)
    return atomic_write_json(onnx_path.with_name(f"{onnx_path.stem}.audit.json"), report)
