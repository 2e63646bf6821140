"""Export: `pdq.load`, the integer checkpoint, ONNX QDQ export and onnxruntime parity, and their bad inputs.

Parity tolerance. onnxruntime and torch accumulate a convolution's float products in different orders, so a value
within float rounding of a grid boundary can take the neighbouring code in one of them; that step propagates to the
logits. `head_step` is what one step of every element of the classifier's (quantized) input moves a logit by at
most: s_in * max_j sum_i |W_ji|. The logits must agree within 3 head steps (the largest difference over the
10,000 test images in docs/deployment.md's 36 parity cells is 2.23), and the predictions on all but at most one image
of a subset."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pdq
from pdq.errors import PdqError
from pdq.export.checkpoint import INT_FILE, load_with_meta, save_int
from pdq.export.cli import main as export_main
from pdq.export.onnx import ONNX_FILE, export_onnx
from pdq.export.pack import pack, packed_size, unpack
from pdq.export.parity import head_step, onnx_logits
from pdq.export.runtime import session
from pdq.models import build_model
from pdq.pipeline import run
from pdq.quant import MinMaxObserver, apply_layout, calibrate_activations, calibrate_weights, quantize_model
from pdq.resume import STATE_FILE
from tests.conftest import EVAL, ROOT, compose_config, make_layout

RESNET = {"builder": "build_model", "name": "resnet20_fmnist"}



def rtn(name: str, w: int, a: int, calib: torch.Tensor, per_layer=()) -> torch.fx.GraphModule:
    """A round-to-nearest (min-max) quantized graph of an embedded model."""
    gm = quantize_model(build_model(name))
    apply_layout(gm, make_layout(w, a, per_layer=list(per_layer)).resolve(gm))
    calibrate_weights(gm, MinMaxObserver())
    calibrate_activations(gm, calib, MinMaxObserver())
    return gm.eval()


def assert_parity(gm, path: Path, x: torch.Tensor) -> None:
    with torch.no_grad():
        ours = gm(x)
    theirs = onnx_logits(session(path), x)
    assert (ours.argmax(1) != theirs.argmax(1)).sum() <= 1
    assert (ours - theirs).abs().max() <= 3 * head_step(gm)


# ---- packing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trips_every_width_at_its_real_size(bits):
    codes = torch.randint(0, 2 ** bits, (7, 5, 3), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and len(packed) == packed_size(105, bits) == -(-105 * bits // 8)
    assert torch.equal(unpack(packed, bits, codes.shape), codes.to(torch.uint8))


def test_pack_is_a_little_endian_bitstream_as_onnx_packs_uint4_and_uint2():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([1, 15]), 4).tolist() == [0xF1]
    assert pack(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    for bits, ttype in ((4, onnx.TensorProto.UINT4), (2, onnx.TensorProto.UINT2)):
        codes = list(range(2 ** bits)) * 3
        tensor = onnx.helper.make_tensor("t", ttype, [len(codes)], codes)
        assert onnx.numpy_helper.to_array(tensor).astype(np.int64).tolist() == codes
        assert bytes(pack(torch.tensor(codes), bits).numpy()) == onnx.numpy_helper.from_array(
            onnx.numpy_helper.to_array(tensor)).raw_data


def test_pack_rejects_codes_off_the_grid_and_bytes_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="do not hold 5 codes of 4 bits"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, (5,))


# ---- integer checkpoint and pdq.load -----------------------------------------------------------------------------

@pytest.mark.parametrize("w,a", [(2, 2), (3, 3), (4, 4), (8, 8)])
def test_integer_checkpoint_round_trip_is_bit_exact_and_weights_take_their_real_width(w, a, data, tmp_path):
    per_layer = ["layer1.0.conv1:32", "layer2.0.aq:32"]  # a float layer and a float activation kept as they are
    gm = rtn("resnet20_fmnist", w, a, data["calib"], per_layer)
    path = save_int(gm, tmp_path / INT_FILE, identity=RESNET, input_shape=[1, 28, 28])
    loaded, meta = load_with_meta(path)
    with torch.no_grad():
        assert torch.equal(loaded(data["x"]), gm(data["x"]))
    assert not loaded.training and meta["weights"]["layer1.0.conv1"]["bits"] == 32 and meta["acts"]["layer2.0.aq"] == 32
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        body = [n for n, s in meta["weights"].items() if s["bits"] == w and n != "layer1.0.conv1"]
        packed = sum(f.get_tensor(f"{n}.weight.codes").numel() for n in body)
        fp32 = sum(4 * np.prod(meta["weights"][n]["shape"]) for n in body)
        assert "layer1.0.conv1.weight" in f.keys() and "layer1.0.conv1.weight.codes" not in f.keys()  # noqa: SIM118
    assert packed / fp32 == pytest.approx(w / 32, rel=1e-3)  # W4: 1/8 of the bytes, W2: 1/16


def test_load_of_a_model_given_as_an_object_needs_it_again(data, tmp_path):
    gm = rtn("resnet20_fmnist", 4, 4, data["calib"])
    path = save_int(gm, tmp_path / INT_FILE, identity={"builder": None, "name": "ResNet", "class": "x.ResNet"},
                    input_shape=[1, 28, 28])
    with pytest.raises(PdqError, match=r"given to pdq as a Python object.*model=<an instance"):
        pdq.load(path)
    with torch.no_grad():
        assert torch.equal(pdq.load(path, model=build_model("resnet20_fmnist"))(data["x"]), gm(data["x"]))
    with pytest.raises(PdqError, match="does not match the model's quantized layers"):
        pdq.load(path, model=build_model("mobilenetv2_fmnist"))


# ---- runs of every method family: load, export at the run's end, parity ----------------------------------------

FAMILIES = {  # method: (bits, settings); small enough for the default suite
    "rtn_mse": ("w3a3", []),
    "qdrop": ("w2a4", ["method.iters=2"]),
    "pdquant": ("w4a4", ["method.iters=2", "method.dc.steps=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method, (bits, settings) in FAMILIES.items():
        run_dir = tmp_path_factory.mktemp(method)
        cfg = compose_config(f"method={method}", f"quant={bits}", "export=onnx", "logger=none", "calib.size=64",
                             "calib.act_init_size=64", f"data.eval_subset={EVAL}", f"paths.output_dir={run_dir}",
                             f"paths.cache_dir={run_dir}/cache", *settings)
        out[method] = (run_dir, run(cfg))
    return out


@pytest.mark.parametrize("method", FAMILIES)
def test_a_run_of_every_method_loads_with_its_own_top1_and_exports_with_onnxruntime_parity(method, runs, data):
    run_dir, results = runs[method]
    model = pdq.load(run_dir, device="cpu")
    assert isinstance(model, nn.Module) and not model.training
    with torch.no_grad():
        top1 = 100.0 * (model(data["x"]).argmax(1) == data["y"]).float().mean().item()
    assert top1 == pytest.approx(results["quant_top1"], abs=1e-3)
    assert results["sizes"]["int_file_bytes"] < results["sizes"]["fp32_state_bytes"] / 3
    assert (run_dir / ONNX_FILE).is_file()  # export=onnx: written at the run's end
    assert_parity(model, run_dir / ONNX_FILE, data["x"])


def test_readme_load_example_runs(runs):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example: pdq.load -->\s*```python\n(.*?)```", text, re.S).group(1)
    run_dir = runs["qdrop"][0]
    scope = {}
    exec(code.replace('"outputs/runs/2026-11-29/12-00-00_resnet20_fmnist_qdrop_w2a4_s1005"', repr(str(run_dir))),
         scope)
    assert scope["logits"].shape == (8, 10)


# ---- ONNX at every width -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,w,a,opset,weight_type,clips", [
    ("resnet20_fmnist", 8, 8, None, onnx.TensorProto.UINT8, 0),
    ("resnet20_fmnist", 4, 4, None, onnx.TensorProto.UINT4, 0),
    ("resnet20_fmnist", 3, 3, None, onnx.TensorProto.UINT4, "a"),  # no 3-bit type: uint4 and a Clip
    ("resnet20_fmnist", 2, 2, None, onnx.TensorProto.UINT2, 0),
    ("resnet20_fmnist", 2, 4, 21, onnx.TensorProto.UINT4, 0),  # no uint2 before opset 25
    ("resnet20_fmnist", 4, 2, 13, onnx.TensorProto.UINT8, "a"),  # opset 13: uint8 and a Clip for every width
    ("mobilenetv2_fmnist", 4, 4, None, onnx.TensorProto.UINT4, 0),  # ReLU6 (Clip) before 4-bit QuantizeLinear
])
def test_onnx_export_has_the_real_integer_types_and_matches_onnxruntime(model, w, a, opset, weight_type, clips, data,
                                                                        tmp_path):
    gm = rtn(model, w, a, data["calib"])
    path = save_int(gm, tmp_path / INT_FILE, identity={"builder": "build_model", "name": model},
                    input_shape=[1, 28, 28])
    out = export_onnx(path, opset=opset)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    body = [n for n, s in json.loads(int_meta(path))["weights"].items() if s["bits"] == w]
    assert {inits[f"{n}.weight_quantized"].data_type for n in body} == {weight_type}
    assert not any(f"{n}.weight" in inits for n in body)  # no float copy of a quantized weight
    n_act = sum(1 for node in proto.graph.node if node.op_type == "QuantizeLinear")
    assert n_act == len([b for b in json.loads(int_meta(path))["acts"].values() if b < 32])
    n_clip = sum(1 for node in proto.graph.node if node.op_type == "Clip" and node.name.endswith(".clip"))
    assert n_clip == (len([b for b in json.loads(int_meta(path))["acts"].values() if b == a]) if clips else 0)
    assert_parity(gm, out, data["x"])


def int_meta(path: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()["pdq"]


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_load_names_a_dir_without_a_finished_run(tmp_path):
    with pytest.raises(PdqError, match="does not exist"):
        pdq.load(tmp_path / "nope")
    with pytest.raises(PdqError, match=r"holds no finished run.*resume="):
        pdq.load(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"state of an interrupted run")
    with pytest.raises(PdqError, match="holds no finished run"):
        export_onnx(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(PdqError, match=f"finished run without {INT_FILE}"):
        pdq.load(tmp_path)


def test_corrupt_or_mismatched_checkpoints_are_named(data, tmp_path):
    good = save_int(rtn("resnet20_fmnist", 4, 4, data["calib"]), tmp_path / INT_FILE, identity=RESNET,
                    input_shape=[1, 28, 28])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    for path, message in ((cut, "not a readable safetensors file"), (junk, "not a readable safetensors file"),
                          (foreign, "has no pdq metadata")):
        with pytest.raises(PdqError, match=message):
            pdq.load(path)
    from safetensors.torch import load_file
    meta = json.loads(int_meta(good))
    meta["weights"]["fc"]["shape"] = [10, 63]
    wrong = tmp_path / "wrong.safetensors"
    save_file(load_file(good), wrong, metadata={"pdq": json.dumps(meta)})
    with pytest.raises(PdqError, match=r"fc's weight is \[10, 63\]"):
        pdq.load(wrong)
    meta = json.loads(int_meta(good))
    meta["model"]["name"] = "mobilenetv2_fmnist"
    save_file(load_file(good), wrong, metadata={"pdq": json.dumps(meta)})
    with pytest.raises(PdqError, match="does not match the model's quantized layers"):
        pdq.load(wrong)


def test_bad_opsets_are_rejected_with_the_accepted_range(runs, tmp_path, capsys):
    run_dir = runs["rtn_mse"][0]
    for opset in (12, 26, "21", True):
        with pytest.raises(PdqError, match=r"opset=.* is not accepted; accepted: 13\.\.25"):
            export_onnx(run_dir, out=tmp_path / "m.onnx", opset=opset)
    assert export_main([str(run_dir), "--format", "onnx", "--opset", "12"]) == 2
    assert "pdq export: error: opset=12 is not accepted" in capsys.readouterr().err
    cfg = compose_config("export=onnx", "export.opset=9", f"paths.output_dir={tmp_path}/run")
    with pytest.raises(PdqError, match="opset=9 is not accepted"):
        run(cfg)
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list(tmp_path.glob("*.onnx"))


class Bessel(nn.Module):
    """A CNN with an operator that has no ONNX function (torch.special.bessel_j0)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.special.bessel_j0(self.conv(x)).mean((2, 3)))


def test_a_model_onnx_cannot_express_is_named_before_the_work_and_leaves_no_file(data, tmp_path):
    with pytest.raises(PdqError, match="no ONNX function for the operator prims.bessel_j0"):
        pdq.quantize(Bessel(), data["calib"][:32], method="rtn_minmax", export="onnx", out_dir=tmp_path)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / INT_FILE).exists()
    qmodel, _ = pdq.quantize(Bessel(), data["calib"][:32], method="rtn_minmax", out_dir=tmp_path / "run")
    with pytest.raises(PdqError, match="prims.bessel_j0"):
        export_onnx(tmp_path / "run", model=Bessel())
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "onnx" in p.name or p.name.endswith(".tmp")) == []


def test_pdq_export_command_writes_the_file_and_prints_it(runs, tmp_path):
    out = tmp_path / "m13.onnx"
    proc = subprocess.run([sys.executable, "-m", "pdq.export", str(runs["qdrop"][0]), "--format", "onnx", "--opset",
                           "13", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout and onnx.load(out).opset_import[0].version == 13
    proc = subprocess.run([sys.executable, "-m", "pdq.export", str(tmp_path), "--format", "onnx"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds no finished run" in proc.stderr
