"""Backends and the quantization primitives: one grid arithmetic at every site, each backend's placement on the zoo
and on torchvision CNNs, the fusion audit of onnxruntime-backend exports, TensorRT's structural rules, parity of
the integer kernels with pdq's simulation, and the bad inputs.

Parity tolerance: as in tests/export/test_export.py (a value within float rounding of a grid boundary takes the
neighbouring code in one of the two; the step propagates), the logits agree within 3 head steps and the predictions
on all but at most one image of a subset. onnxruntime's integer kernels add their requantisation rounding (one more
code at most per quantizer) on top, so their bound is 6 head steps and 2 predictions."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, numpy_helper
from torch import nn

import pdq
from pdq.errors import PdqError
from pdq.export.audit import audit
from pdq.export.checkpoint import INT_FILE, read_int, weight_codes
from pdq.export.onnx import build_qdq, export_onnx
from pdq.export.parity import head_step, onnx_logits
from pdq.export.runtime import disabled_optimizers, session
from pdq.models import build_model
from pdq.quant import MinMaxObserver, apply_layout, calibrate_activations, calibrate_weights, quantize_model
from pdq.quant.adaround import AdaRoundQuantizer
from pdq.quant.backends import BACKENDS
from pdq.quant.functional import Grid, fake_quantize, fake_quantize_fused, from_codes, qparams_from_range, to_codes
from pdq.quant.graph import (
    integer_plan,
    is_act_quant,
    is_add,
    is_quant_layer,
    quant_layer_names,
    quantizer_before,
)
from pdq.quant.observers import CosineObserver, LpObserver
from pdq.quant.quantizers import WeightQuantizer
from tests.conftest import EVAL, compose_config, make_layout

GRIDS = [Grid(b) for b in (2, 4, 8)] + [Grid(b, symmetric=True) for b in (4, 8)] + [
    Grid(b, signed=True, symmetric=True, narrow=n) for b in (2, 4, 8) for n in (False, True)]


def calibrated(model: nn.Module, backend: str, x: torch.Tensor, w: int = 8, a: int = 8) -> torch.fx.GraphModule:
    gm = quantize_model(model, backend=backend)
    apply_layout(gm, make_layout(w, a, backend=backend).resolve(gm))
    calibrate_weights(gm, MinMaxObserver())
    calibrate_activations(gm, x, MinMaxObserver())
    return gm.eval()


def torchvision_cnn(name: str) -> nn.Module:
    """A random-weight torchvision CNN whose BatchNorm statistics are random too (with the default ones every
    folded bias is the same, and the exporter shares identical initializers)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()



# ---- primitives --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_fake_quantize_is_from_codes_of_to_codes_and_the_fused_node_matches_it(grid):
    g = torch.Generator().manual_seed(grid.bits)
    x = torch.randn(4, 6, 5, 5, generator=g) * 3
    lo, hi = torch.aminmax(x.movedim(1, 0).reshape(6, -1), dim=1)
    scale, zp = qparams_from_range(lo * 0.4, hi * 0.4, grid)  # some values clip
    s, z = scale.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1)
    codes = to_codes(x, s, z, grid)
    assert codes.min() >= grid.q_min and codes.max() <= grid.q_max and torch.equal(codes, codes.round())
    assert codes.min() == grid.q_min and codes.max() == grid.q_max  # both ends are reached (clipping)
    if grid.symmetric:
        assert torch.equal(zp, torch.zeros_like(zp))
    expected = from_codes(codes, s, z)
    assert torch.equal(fake_quantize(x, s, z, grid), expected)
    assert torch.equal(fake_quantize_fused(x, s, z, grid), expected)
    # gradients: STE for the input, LSQ for the scale, as autograd's graph of `fake_quantize`
    xa, sa = x.clone().requires_grad_(), s.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), s.clone().requires_grad_()
    up = torch.randn(x.shape, generator=g)
    (fake_quantize(xa, sa, z, grid) * up).sum().backward()
    (fake_quantize_fused(xb, sb, z, grid) * up).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)  # autograd's s * (g / s) is g up to rounding
    assert torch.allclose(sa.grad, sb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_weight_quantizer_adaround_and_checkpoint_codes_use_the_same_grid(grid):
    torch.manual_seed(grid.bits)
    conv = nn.Conv2d(3, 8, 3)
    wq = WeightQuantizer(grid.bits, 8)
    wq.set_grid(grid.signed, grid.symmetric, grid.narrow)
    wq.observe(conv.weight, LpObserver(grid=20))
    assert wq.grid == grid
    s, z = wq.scale.reshape(-1, 1, 1, 1), wq.zero_point.reshape(-1, 1, 1, 1)
    expected = fake_quantize(conv.weight.detach(), s, z, grid)
    assert torch.equal(wq(conv.weight.detach()), expected)
    layer = nn.Module()
    layer.weight, layer.weight_quant = conv.weight, wq
    assert torch.equal(weight_codes(layer), to_codes(conv.weight.detach(), s, z, grid).long())
    ada = AdaRoundQuantizer(wq, conv.weight.detach())
    soft = ada(conv.weight.detach())
    assert soft.min() >= (from_codes(torch.tensor(grid.q_min), s, z)).min() - 1e-6
    ada.harden()  # at initialisation h(V) = frac(W/s): the hard rounding is rounding to nearest (bar exact halves)
    hard = ada(conv.weight.detach())
    assert (hard != expected).float().mean() < 0.01
    assert torch.equal(to_codes(hard, s, z, grid), to_codes(hard, s, z, grid).clamp(grid.q_min, grid.q_max))


@pytest.mark.parametrize("observer", [MinMaxObserver(), LpObserver(grid=30), CosineObserver(grid=30)], ids=repr)
def test_observers_on_symmetric_grids_fix_the_zero_point_at_zero(observer):
    x = torch.randn(4, 200) * torch.tensor([[1.0], [2.0], [0.5], [3.0]]) + 0.3
    signed = Grid(8, signed=True, symmetric=True, narrow=True)
    scale, zp = observer(x, signed, ch_axis=0)
    assert torch.equal(zp, torch.zeros(4))
    assert (scale * signed.q_max <= x.abs().amax(1) * (1 + 1e-6)).all()  # at most the range (clipping allowed)
    unsigned = Grid(8, symmetric=True)
    relu = x.clamp(min=0)
    scale, zp = observer(relu, unsigned, ch_axis=0)
    assert torch.equal(zp, torch.zeros(4)) and (scale * 255 <= relu.amax(1) * (1 + 1e-6)).all()
    if isinstance(observer, MinMaxObserver):
        assert torch.allclose(scale * 255, relu.amax(1))


def test_grids_reject_impossible_combinations():
    with pytest.raises(ValueError, match="signed grid"):
        Grid(8, signed=True)
    with pytest.raises(ValueError, match="narrow"):
        Grid(8, narrow=True)
    assert (Grid(8).q_min, Grid(8).q_max) == (0, 255)
    assert (Grid(4, signed=True, symmetric=True, narrow=True).q_min, Grid(4, True, True, True).q_max) == (-7, 7)
    assert Grid(8, signed=True, symmetric=True).q_min == -128


# ---- placement ---------------------------------------------------------------------------------------------------

MODELS = {"resnet20_fmnist": ([1, 28, 28], lambda: build_model("resnet20_fmnist")),
          "mobilenetv2_fmnist": ([1, 28, 28], lambda: build_model("mobilenetv2_fmnist")),
          "resnet18": ([3, 64, 64], lambda: torchvision_cnn("resnet18")),
          "mobilenet_v2": ([3, 64, 64], lambda: torchvision_cnn("mobilenet_v2")),
          "regnet_x_400mf": ([3, 64, 64], lambda: torchvision_cnn("regnet_x_400mf"))}


@pytest.mark.parametrize("name", MODELS)
def test_backend_placement_gives_every_integer_kernel_its_quantizers(name):
    shape, make = MODELS[name]
    model = make()
    academic = quantize_model(model)
    for backend in ("onnxruntime", "tensorrt"):
        gm = quantize_model(model, backend=backend)
        apply_layout(gm, make_layout(8, 8, backend=backend).resolve(gm))
        nodes = list(gm.graph.nodes)
        placeholder = nodes[0]
        assert [u for u in placeholder.users if is_act_quant(gm, u)], "the model input is quantized"
        for n in nodes:
            if is_quant_layer(gm, n):
                assert quantizer_before(gm, n.args[0]) is not None, f"{n.target}: no quantizer before it"
                layer = gm.get_submodule(n.target)
                assert layer.weight_quant.grid == Grid(8, signed=True, symmetric=True, narrow=True)
            if is_add(n):
                inputs = [a for a in n.args if isinstance(a, torch.fx.Node)]
                quantized = [quantizer_before(gm, a) is not None for a in inputs]
                if backend == "onnxruntime":
                    assert all(quantized), f"{n.name}: both inputs of an add are quantized"
                else:  # one conv fuses with the add (no quantizer between them), the residual input is quantized
                    convs = [a for a in inputs if is_quant_layer(gm, a)]
                    assert len(convs) <= 1 and sum(quantized) == len(inputs) - len(convs) >= 1, n.name
        grids = {gm.get_submodule(n.target).grid for n in nodes if is_act_quant(gm, n)}
        if backend == "tensorrt":
            assert grids == {Grid(8, signed=True, symmetric=True)}
        else:
            assert Grid(8) in grids and Grid(8, symmetric=True) in grids and not any(g.signed for g in grids)
        plan = integer_plan(gm)
        assert plan["float"] == {} and len(plan["integer"]) >= len(quant_layer_names(gm))
        assert set(quant_layer_names(gm)) == set(quant_layer_names(academic))
    # the academic placement is the papers': no quantizer on the input, convs that only feed adds unquantized
    assert not [u for u in next(iter(academic.graph.nodes)).users if is_act_quant(academic, u)]
    assert integer_plan(academic)["backend"] == "academic" and not integer_plan(academic)["integer"]


def test_integer_plan_names_the_layers_below_8_bits():
    gm = quantize_model(build_model("resnet20_fmnist"), backend="onnxruntime")
    apply_layout(gm, make_layout(4, 8, backend="onnxruntime").resolve(gm))
    plan = integer_plan(gm)
    assert plan["float"]["layer1.0.conv1"] == "weights at 4 bits"
    assert "conv1" in plan["integer"] and "fc" in plan["integer"]  # the stem and head keep 8-bit weights


def test_bias_is_on_the_int32_grid_of_input_times_weight_scale(data):
    gm = calibrated(build_model("resnet20_fmnist"), "onnxruntime", data["calib"])
    layer = gm.get_submodule("layer1.0.conv2")
    source = layer.__dict__["bias_source"]
    assert source is gm.get_submodule("layer1.0.conv1.aq")
    scale = (source.scale * layer.weight_quant.scale).reshape(-1)
    codes = layer.quantized_bias() / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and not torch.equal(layer.quantized_bias(), layer.bias)
    copied = copy.deepcopy(gm)  # the link follows a copy of the whole graph
    assert copied.get_submodule("layer1.0.conv2").__dict__["bias_source"] is copied.get_submodule("layer1.0.conv1.aq")
    source.enabled = False  # an unquantized input: the float bias
    assert layer.quantized_bias() is layer.bias


# ---- export, fusion audit, TensorRT structure --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20_fmnist", "mobilenetv2_fmnist", "resnet18"])
def test_onnxruntime_backend_w8a8_fuses_every_conv_add_and_gemm(name, tmp_path):
    shape, make = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(16, *shape)
    gm = calibrated(make(), "onnxruntime", x)
    path = tmp_path / "model.onnx"
    onnx.save(build_qdq(gm, shape, 18), path)
    report = audit(path, disabled_optimizers=disabled_optimizers(path))
    convs, adds = len(quant_layer_names(gm)) - 1, sum(is_add(n) for n in gm.graph.nodes)
    assert report["integer"].get("QLinearConv") == convs
    assert report["integer"].get("QLinearAdd", 0) == adds
    assert report["integer"].get("QGemm") == 1
    assert [f["op"] for f in report["float_ops"]] == ["ReduceMean"]  # the global pool: no QDQ fusion in onnxruntime
    assert report["weight_dequantize"] == [] and report["summary"]["inner_transposes"] == 0
    model = onnx.load(path)
    zero_points = [i for i in model.graph.initializer if i.name.endswith(".weight_zero_point")]
    assert zero_points and all(i.data_type == TensorProto.INT8 and not numpy_helper.to_array(i).any()
                               for i in zero_points)
    biases = [i for i in model.graph.initializer if i.name.endswith(".bias_quantized")]
    assert len(biases) == convs + 1 and all(i.data_type == TensorProto.INT32 for i in biases)
    with torch.no_grad():
        ours = gm(x)
    for fuse in (False, True):
        theirs = onnx_logits(session(path, fuse=fuse), x)
        assert (ours - theirs).abs().max() <= 6 * head_step(gm)


def test_tensorrt_backend_export_is_int8_symmetric_with_residual_qdq(tmp_path):
    shape, make = MODELS["resnet18"]
    torch.manual_seed(0)
    x = torch.randn(8, *shape)
    gm = calibrated(make(), "tensorrt", x)
    path = tmp_path / "model.onnx"
    onnx.save(build_qdq(gm, shape, 18), path)
    g = onnx.load(path).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in qdq:
        zero_point = inits[n.input[2]]
        assert zero_point.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero_point).any(), n.name
    weight_dq = [n for n in qdq if n.input[0] in inits]
    assert len(weight_dq) == len(quant_layer_names(gm))
    for n in weight_dq:
        axis = next(a.i for a in n.attribute if a.name == "axis")
        assert axis == 0 and inits[n.input[1]].dims[0] == inits[n.input[0]].dims[0]
    adds = [n for n in g.node if n.op_type == "Add"]
    assert len(adds) == sum(is_add(n) for n in gm.graph.nodes) == 8
    for add in adds:
        kinds = sorted(producer[v].op_type for v in add.input)
        assert kinds == ["Conv", "DequantizeLinear"], (add.name, kinds)  # conv straight in, residual through Q/DQ
    with torch.no_grad():
        ours = gm(x)
    theirs = onnx_logits(session(path), x)
    assert (ours - theirs).abs().max() <= 3 * head_step(gm)


# ---- runs: parity on the test split, pdq.quantize, old run dirs, bad input ---------------------------------------

@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    """One short rtn_minmax W8A8 run per runtime backend on ResNet-20, exported."""
    from pdq.pipeline import run

    runs = {}
    for backend in ("onnxruntime", "tensorrt"):
        out = tmp_path_factory.mktemp(backend)
        cfg = compose_config("method=rtn_minmax", "quant=w8a8", f"quant.backend={backend}", "logger=none",
                             "calib.size=128", "calib.act_init_size=128", f"data.eval_subset={EVAL}",
                             f"paths.output_dir={out}", "paths.cache_dir=null", "export=onnx")
        runs[backend] = (out, run(cfg))
    return runs


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_a_backend_run_records_its_plan_and_onnxruntime_agrees_with_its_evaluation(backend, backend_runs, data):
    out, results = backend_runs[backend]
    assert results["backend"] == backend and results["integer_plan"]["float"] == {}
    assert read_int(out / INT_FILE)[1]["backend"] == backend
    audit_file = json.loads((out / "quantized_model.audit.json").read_text())
    if backend == "onnxruntime":
        assert audit_file["summary"]["float"] == 1 and audit_file["integer"]["QLinearConv"] == 21
    model = pdq.load(out)
    with torch.no_grad():
        ours = model(data["x"])
    top1 = 100 * (ours.argmax(1) == data["y"]).float().mean().item()
    assert abs(top1 - results["quant_top1"]) < 1e-3  # results.json rounds to 4 decimals
    for fuse, steps, flips in ((False, 3, 1), (True, 6, 2)):
        theirs = onnx_logits(session(out / "quantized_model.onnx", fuse=fuse), data["x"])
        assert (ours.argmax(1) != theirs.argmax(1)).sum() <= flips
        assert (ours - theirs).abs().max() <= steps * head_step(model)


@pytest.mark.parametrize("method, backend, learn_weight_scale", [("adaround", "onnxruntime", False),
                                                                ("pdquant", "tensorrt", False),
                                                                ("qdrop", "onnxruntime", True)])
def test_reconstruction_methods_run_under_a_runtime_backend_and_export_what_they_optimised(method, backend,
                                                                                            learn_weight_scale,
                                                                                            tmp_path, data):
    """The engine treats the backend's extra quantizers as ordinary ones (units, caches, DC, LSQ, learned weight
    scales): AdaRound's single-layer units and PD-Quant's blocks both run, and the exported model gives the run's
    logits (with learned weight scales, on the symmetric int8 grid and its int32 biases)."""
    from pdq.pipeline import run

    results = run(compose_config(f"method={method}", "quant=w4a4", f"quant.backend={backend}", "logger=none",
                                 "calib.size=64", "calib.act_init_size=64", "method.iters=2",
                                 f"method.learn_weight_scale={learn_weight_scale}",
                                 f"data.eval_subset={EVAL}", f"paths.output_dir={tmp_path}", "paths.cache_dir=null",
                                 "export=onnx"))
    acts = {a for row in results["unit_table"] for a in row["act_quants"]}
    assert "input_aq" not in acts and (backend != "onnxruntime" or "layer1.0.conv2.aq" in acts)
    model = pdq.load(tmp_path)
    assert pdq.load(tmp_path).get_submodule("input_aq").grid.signed == (backend == "tensorrt")
    with torch.no_grad():
        ours = model(data["x"])
    theirs = onnx_logits(session(tmp_path / "quantized_model.onnx"), data["x"])
    assert (ours.argmax(1) != theirs.argmax(1)).sum() <= 1
    assert (ours - theirs).abs().max() <= 3 * head_step(model)


def test_an_old_run_dir_without_a_backend_exports_as_academic(backend_runs, tmp_path):
    from safetensors.torch import save_file

    out, _ = backend_runs["onnxruntime"]
    tensors, meta = read_int(out / INT_FILE)
    academic = quantize_model(build_model("resnet20_fmnist"))
    apply_layout(academic, make_layout(8, 8).resolve(academic))
    calibrate_weights(academic, MinMaxObserver())
    calibrate_activations(academic, torch.randn(8, 1, 28, 28), MinMaxObserver())
    from pdq.export.checkpoint import int_tensors
    tensors, weights, acts = int_tensors(academic)
    meta = {k: v for k, v in meta.items() if k != "backend"}
    meta.update(weights=weights, acts=acts, version=1)  # as the checkpoints before the backends
    save_file(tensors, tmp_path / INT_FILE, metadata={"pdq": json.dumps(meta)})
    gm = pdq.load(tmp_path)
    assert not [n for n in gm.graph.nodes if n.target == "input_aq"]
    path = export_onnx(tmp_path)
    types = {i.data_type for i in onnx.load(path).graph.initializer if i.name.endswith("zero_point")}
    assert types == {TensorProto.UINT8}


def test_pdq_quantize_takes_the_backend(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    qmodel, results = pdq.quantize(model, torch.randn(32, 3, 16, 16), method="rtn_minmax", bits="w8a8",
                                   backend="tensorrt", out_dir=tmp_path, logger="none")
    assert results["backend"] == "tensorrt" and results["integer_plan"]["float"] == {}
    assert qmodel.get_submodule("input_aq").grid == Grid(8, signed=True, symmetric=True)


def test_an_unknown_backend_is_one_error_naming_the_accepted(tmp_path):
    with pytest.raises(PdqError, match=r"quant.backend='tflite' is unknown; accepted: academic, onnxruntime, tensorrt"):
        make_layout(8, 8, backend="tflite")
    from pdq.pipeline import run

    cfg = compose_config("quant.backend=tflite", f"paths.output_dir={tmp_path}")
    with pytest.raises(PdqError, match="accepted: " + ", ".join(BACKENDS)):
        run(cfg)
    assert not any(tmp_path.iterdir())


def test_a_sub_8_bit_export_names_its_float_layers_in_the_audit(data, tmp_path):
    gm = calibrated(build_model("resnet20_fmnist"), "onnxruntime", data["calib"], w=4, a=8)
    path = tmp_path / "model.onnx"
    onnx.save(build_qdq(gm, [1, 28, 28], 21), path)
    report = audit(path, disabled_optimizers=disabled_optimizers(path))
    floats = [f for f in report["float_ops"] if f["kind"] == "conv"]
    assert len(floats) == 20  # every conv but the 8-bit stem (21 in all)
    assert all("below 8 bits" in e for e in report["explanations"] if e.startswith("Conv"))
    assert np.array_equal(sorted(integer_plan(gm)["integer"]), sorted(["conv1", "fc"] + [
        n.name for n in gm.graph.nodes if is_add(n)]))


#: state_sha256 of quantized_model.pt of one short academic run per method family, written by the code before the
#: backends and the shared primitives (the academic backend must stay bit for bit), at one thread
ACADEMIC = {"rtn_mse": "f9e7dcfe04dcb04ac19c0a2a1f979cc8c5267e52655c6708d77124d316b5bc99",
            "qdrop": "6d3001cf6f26f6e7dcf8f3b518b25655bbd4892f2b22b93dde6319e74940969b",
            "pdquant": "0d1510fb7267c3a301c63aec550acc6555bed7f0db38fb999a883881f1d4e397"}


@pytest.mark.parametrize("method", ACADEMIC)
def test_the_academic_backend_is_bit_for_bit_what_it_was(method, tmp_path):
    from pdq.distributed import state_sha256
    from pdq.pipeline import run

    overrides = [f"method={method}", "quant=w4a4", "logger=none", "calib.size=64", "calib.act_init_size=64",
                 "calib.batch_size=32", "data.eval_subset=256", "seed=3", f"paths.output_dir={tmp_path}",
                 "paths.cache_dir=null"] + ([] if method == "rtn_mse" else ["method.iters=3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digests were taken at one thread (float sums depend on the split)
    try:
        run(compose_config(*overrides))
    finally:
        torch.set_num_threads(threads)
    state = nn.Module()
    for key, value in torch.load(tmp_path / "quantized_model.pt").items():
        state.register_buffer(key.replace(".", "__"), value)
    assert state_sha256(state) == ACADEMIC[method]
