"""The fusion audit (`pdq.export.audit`) on graphs made by torch's exporter and onnxruntime's own quantizer."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pdq.errors import PdqError  # noqa: E402
from pdq.export.audit import audit, format_audit, write_audit  # noqa: E402


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """ResNet-20 (FMNIST) exported in FP32, and quantized by onnxruntime to QDQ (per-channel int8 weights)."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from pdq.models import build_model

    folder = tmp_path_factory.mktemp("audit")
    fp, q = folder / "fp.onnx", folder / "q.onnx"
    model = build_model("resnet20_fmnist").eval()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 28, 28),), fp, dynamo=True, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((2, 1, 28, 28), dtype=np.float32)} for _ in range(3)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return fp, q


def test_quantized_resnet_runs_on_integers(resnet):
    _, q = resnet
    report = audit(q)
    assert report["integer"] == {"QLinearConv": 21, "QLinearAdd": 9, "QGemm": 1}
    assert not [f for f in report["float_ops"] if f["kind"] in ("conv", "add", "gemm", "matmul")]
    assert report["weight_dequantize"] == []
    assert len(report["transposes"]) == 2 and all(t["at_end"] for t in report["transposes"])
    assert report["summary"] == {"integer": 31, "float": 1, "weight_dequantize": 0, "transposes": 2,
                                 "inner_transposes": 0}
    (pool,) = report["float_ops"]
    assert (pool["op"], pool["kind"]) == ("ReduceMean", "pool")
    assert report["explanations"] == [f"ReduceMean {pool['name']} (pool): onnxruntime has no QDQ fusion for ReduceMean"]
    optimized = q.with_name("q.optimized.onnx")
    assert report["optimized_model"] == str(optimized) and optimized.is_file()
    assert report["op_counts"]["QLinearConv"] == 21 and report["onnxruntime"] == ort.__version__


def test_fp32_export_stays_float(resnet, tmp_path):
    fp, _ = resnet
    report = audit(fp, optimized_path=tmp_path / "fp.opt.onnx")
    assert (tmp_path / "fp.opt.onnx").is_file() and report["integer"] == {}
    kinds = [f["kind"] for f in report["float_ops"]]
    # the 9 residual Adds are fused into the convolutions before them (NCHWc Conv with a Sum input)
    assert (kinds.count("conv"), kinds.count("gemm"), kinds.count("pool")) == (21, 1, 1)
    assert sum(f["fused_add"] for f in report["float_ops"]) == 9
    assert len(report["explanations"]) == len(report["float_ops"]) == 23
    assert all(e.endswith("(no quantizer before it)") for e in report["explanations"])

    # without the fusions of an Add into a Conv, the Adds are ops of their own
    report = audit(fp, optimized_path=tmp_path / "fp.plain.onnx",
                   disabled_optimizers=["NchwcTransformer", "ConvAddActivationFusion"])
    kinds = [f["kind"] for f in report["float_ops"]]
    assert (kinds.count("conv"), kinds.count("add"), kinds.count("gemm")) == (21, 9, 1)
    assert len(report["explanations"]) == 32
    assert all(f["source"] for f in report["float_ops"])


def test_conv_without_output_quantizer_stays_float(resnet, tmp_path):
    """Remove the QuantizeLinear/DequantizeLinear pair after a Conv that feeds only another Conv."""
    _, q = resnet
    model = onnx.load(str(q))
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name, op):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        quant = only(conv.output[0], "QuantizeLinear")
        dequant = quant and only(quant.output[0], "DequantizeLinear")
        if dequant and all(n.op_type == "Conv" for n in consumers[dequant.output[0]]):
            break
    else:
        pytest.fail("no Conv -> Q -> DQ -> Conv in the quantized ResNet-20")
    nxt = consumers[dequant.output[0]]
    for n in nxt:
        n.input[0] = conv.output[0]
    model.graph.node.remove(quant)
    model.graph.node.remove(dequant)
    cut = tmp_path / "cut.onnx"
    onnx.save(model, str(cut))

    report = audit(cut)
    floats = {f["source"]: f for f in report["float_ops"]}
    assert floats[conv.name]["kind"] == "conv" and all(floats[n.name]["kind"] == "conv" for n in nxt)
    lines = {f["source"]: e for f, e in zip(report["float_ops"], report["explanations"], strict=True)}
    assert lines[conv.name].endswith(": no QuantizeLinear after it")
    assert all(lines[n.name].endswith("(no quantizer before it)") for n in nxt)
    weight = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1])
    assert weight.name in report["weight_dequantize"]
    assert report["integer"]["QLinearConv"] == 21 - 1 - len(nxt)
    assert report["summary"]["inner_transposes"] > 0  # the float pair cuts the NHWC region


def _qdq_graph(path, weight_type):
    """X -> MaxPool -> Conv -> ConvTranspose -> Y with a Q/DQ pair on each activation and weights of `weight_type`."""
    nodes, inits = [], [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                        helper.make_tensor("z", TensorProto.UINT8, [], [128]),
                        helper.make_tensor("w", weight_type, [4, 4, 3, 3], [1] * 144),
                        helper.make_tensor("wz", weight_type, [], [0])]

    def qdq(x, name):
        nodes.append(helper.make_node("QuantizeLinear", [x, "s", "z"], [f"{name}_q"], name=f"{name}_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"], name=f"{name}_DQ"))
        return f"{name}_dq"

    nodes.append(helper.make_node("DequantizeLinear", ["w", "s", "wz"], ["w_dq"], name="w_DQ"))
    nodes.append(helper.make_node("MaxPool", [qdq("X", "in")], ["pooled"], name="pool", kernel_shape=[2, 2]))
    nodes.append(helper.make_node("Conv", [qdq("pooled", "mid"), "w_dq"], ["conved"], name="conv", pads=[1] * 4))
    nodes.append(helper.make_node("ConvTranspose", [qdq("conved", "mid2"), "w_dq"], ["y"], name="deconv"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(qdq("y", "out"), TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_maxpool_on_uint8_is_integer_and_unfusable_ops_are_explained(tmp_path):
    report = audit(_qdq_graph(tmp_path / "int8.onnx", TensorProto.INT8))
    assert report["integer"] == {"MaxPool(uint8)": 1, "QLinearConv": 1}
    assert [(f["op"], f["kind"]) for f in report["float_ops"]] == [("ConvTranspose", "conv")]
    assert report["explanations"] == ["ConvTranspose deconv (conv): onnxruntime has no QDQ fusion for ConvTranspose"]
    # onnxruntime gives each user of a shared DequantizeLinear its own copy ("w_DQ/duplicated"); the
    # ConvTranspose's stays
    (weight,) = report["weight_dequantize"]
    assert weight.startswith("w_DQ")

    report = audit(_qdq_graph(tmp_path / "int4.onnx", TensorProto.INT4))
    assert report["integer"] == {"MaxPool(uint8)": 1}
    assert report["explanations"] == ["Conv conv (conv): its weight is quantized below 8 bits",
                                      "ConvTranspose deconv (conv): onnxruntime has no QDQ fusion for ConvTranspose"]


def test_write_and_format(resnet, tmp_path):
    _, q = resnet
    report = audit(q, optimized_path=tmp_path / "opt.onnx")
    written = write_audit(report, tmp_path / "model.onnx")
    assert written == tmp_path / "model.audit.json"
    assert json.loads(written.read_text()) == json.loads(json.dumps(report))
    text = format_audit(report)
    assert "integer ops: 31 (QLinearConv 21, QLinearAdd 9, QGemm 1)" in text
    assert "float compute ops: 1 (ReduceMean 1)" in text and "transposes: 2 (0 inner)" in text
    assert "no QDQ fusion for ReduceMean" in text and len(text.splitlines()) <= 10


def test_bad_files(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(PdqError, match="missing.onnx"):
        audit(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_text("not an onnx model\n")
    with pytest.raises(PdqError, match="junk.onnx"):
        audit(junk)
    with pytest.raises(PdqError, match="overwrite"):
        audit(junk, optimized_path=junk)
