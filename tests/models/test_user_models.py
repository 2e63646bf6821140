"""Any CNN (issue 13): units from the graph's cut points for every traceable torchvision CNN, every method
runs on them, and a user's own model goes in from the command line or from Python."""

import json
import logging
import os
import re
from functools import partial

import lightning as L
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import pdq
from pdq.context import RunContext
from pdq.errors import PdqError, instantiate
from pdq.models import build_custom, build_model
from pdq.pipeline import run
from pdq.quant import quant_layer_names, quantize_model
from pdq.quant.state import set_quant_state
from pdq.recon import find_units, register_block
from pdq.recon.subgraph import prefix, suffix
from pdq.recon.units import BLOCK_TYPES, MAX_UNIT_LAYERS, cut_points, data_path, enclosing, warn_about
from tests.conftest import ROOT, compose_config, run_cli

#: block-pattern unit counts, pinned: the zoo keeps its BRECQ blocks, the others get one unit per block
UNITS = {
    "resnet18": 10, "resnet50": 18, "mobilenet_v2": 20, "regnet_x_400mf": 24, "regnet_x_3_2gf": 27,
    "mnasnet1_0": 21, "mobilenet_v3_large": 19,
    "shufflenet_v2_x0_5": 19, "densenet121": 9, "googlenet": 13, "squeezenet1_0": 10, "efficientnet_b0": 19,
    "mobilenet_v3_small": 15, "convnext_tiny": 23, "regnet_y_400mf": 18, "resnext50_32x4d": 18, "mnasnet0_5": 21,
}
#: the torchvision CNNs outside the paper zoo, on which every method runs; the larger ones (up to minutes each on
#: a 2-core CPU: every layer is a unit for AdaRound) in the slow suite, their units and suffixes in the default one
SLOW = ["googlenet", "densenet121", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "resnext50_32x4d",
        "mnasnet0_5"]
OTHERS = ["shufflenet_v2_x0_5", "squeezenet1_0", "mobilenet_v3_small",
          *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]


def tv(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, num_classes=10, **extra, **kwargs).eval()


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_cut_point_regions_and_the_fp_suffix_of_each_gives_the_output(name):
    model = tv(name)
    qm = quantize_model(model)
    units = find_units(qm, "block")
    assert len(units) == UNITS[name]
    assert sorted(x for u in units for x in u.layers(qm)) == sorted(quant_layer_names(qm))
    path = data_path(qm)
    cuts, pos = set(cut_points(path)), {n: i for i, n in enumerate(path)}
    for u in units:  # one entry, one exit, both cut points, and every node between them inside
        assert u.input in cuts and u.output in cuts, u.name
        between = {n for n in path if pos[u.input] < pos[n] <= pos[u.output]}
        assert between <= set(u.nodes), u.name
    set_quant_state(qm, weight=False, act=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for u in units:
            out = suffix(qm, u.output)(prefix(qm, u.output)(x))
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), u.name


def test_cut_points_of_a_small_graph():
    class Net(nn.Module):  # a -> (b, c) -> add -> d: b and c are no cut points
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv2d(3, 3, 1) for _ in range(4))

        def forward(self, x):
            y = self.a(x)
            return self.d(self.b(y) + self.c(y))

    gm = torch.fx.symbolic_trace(Net())
    assert [n.name for n in cut_points(data_path(gm))] == ["x", "a", "add", "d"]


def _engine_run(model: nn.Module, method: str, **settings) -> list[dict]:
    """`method` on `model` through the reconstruction engine: one step per unit, four 32x32 images, a coarse
    weight search (speed only)."""
    cfg = compose_config(f"method={method}", "method.iters=1", "model.ptq.dc_steps=1",
                         "method.weight_observer.grid=4", "method.act_observer.grid=8",
                         *(f"method.{k}={v}" for k, v in settings.items()))
    m = instantiate(cfg.method)
    qm = quantize_model(model)
    trainer = partial(L.Trainer, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    ctx = RunContext(device=torch.device("cpu"), seed=0, batch_size=4, act_init_size=4, cache_dtype=torch.float32,
                     channels_last=False, reconstruct_stem=True, trainer=trainer, fp_model=model)
    units = m.quantize(qm, torch.randn(4, 3, 32, 32), ctx)
    assert torch.isfinite(qm(torch.randn(2, 3, 32, 32))).all()
    return units


@pytest.mark.parametrize("name", OTHERS)
def test_every_method_runs_on_cnns_outside_the_zoo(name):
    model = tv(name)
    for method in ("qdrop", "brecq", "adaround", "pdquant"):
        units = _engine_run(model, method, **({"act_iters": 1} if method == "brecq" else {}))
        assert {u["iters"] for u in units} == {0, 1} or {u["iters"] for u in units} == {1}, method


def test_pd_term_of_a_layer_inside_a_branch_uses_the_enclosing_unit():
    model = tv("shufflenet_v2_x0_5")
    units = _engine_run(model, "pd_scale", pattern="layer")
    qm = quantize_model(model)
    assert len(units) == len(quant_layer_names(qm))
    trained = [u for u in units if u["iters"]]  # the layers with an activation quantizer to learn
    assert trained and all("pd_loss" in u for u in trained)
    layers = find_units(qm, "layer")
    inside = {u.name for u, outer in zip(layers, enclosing(qm, layers), strict=True) if outer is not None}
    assert len(inside & {u["name"] for u in trained}) >= 10


def test_registered_block_hint_and_warnings():
    class Chain(nn.Module):  # a plain chain of 8 convs: split into single layers unless registered
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(8)))

        def forward(self, x):
            return self.convs(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.head = nn.Conv2d(3, 4, 3), Chain(), nn.Linear(4, 10)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    qm = quantize_model(Net())
    units = find_units(qm)
    assert len(units) == 10 and all(u.kind == "layer" for u in units)
    assert any("single-layer units" in w for w in warn_about(qm, units, "block"))
    register_block(Chain)
    try:
        units = find_units(qm)
        assert [(u.name, u.source, len(u.layers(qm))) for u in units] == [
            ("stem", "layer", 1), ("body", "registered", 8), ("head", "layer", 1)]
        assert any(f"more than {MAX_UNIT_LAYERS}" in w for w in warn_about(qm, units, "block"))
    finally:
        BLOCK_TYPES.remove(Chain)


# ---------------------------------------------------------------------------------------- your own model

USER_MODULE = '''
import torch
from torch import nn


class SENet(nn.Module):
    """A small DenseNet-style CNN with a squeeze-excitation gate and a Dropout+Linear head."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.dense = nn.ModuleList(nn.Conv2d(width * (i + 1), width, 3, padding=1) for i in range(3))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4 * width, width, 1), nn.ReLU(),
                                nn.Conv2d(width, 4 * width, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        feats = [self.stem(x)]
        for conv in self.dense:
            feats.append(torch.relu(conv(torch.cat(feats, 1))))
        x = torch.cat(feats, 1)
        x = x * self.se(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def senet(**kwargs):
    return SENet(**kwargs)


def senet_half(**kwargs):
    return SENet(**kwargs).half()


class TwoInputs(SENet):
    def forward(self, x, mask):
        return super().forward(x * mask)
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """An importable module `my_models` holding the user's model, on sys.path and PYTHONPATH."""
    (tmp_path / "my_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import my_models

    torch.manual_seed(0)
    model = my_models.SENet(width=8).eval()
    ckpt = tmp_path / "senet.pt"
    torch.save(model.state_dict(), ckpt)
    return tmp_path, model, ckpt


QUICK = ["calib.size=64", "calib.batch_size=32", "calib.act_init_size=32", "data.eval_subset=200", "logger=none",
         "model.ptq.iters=2", "model.ptq.dc_steps=2", "method.weight_observer.grid=8"]


def test_user_class_from_the_command_line_and_the_same_model_from_python(user_pkg, tmp_path):
    where, model, ckpt = user_pkg
    proc = run_cli("model=custom", "model.target=my_models.SENet", "model.kwargs={width: 8}",
                   f"model.checkpoint={ckpt}", "method=pdquant", *QUICK, f"hydra.run.dir={tmp_path}/cli", cwd=where)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert [(r["name"], r["source"]) for r in cli["unit_table"]] == [
        ("stem.0", "layer"), ("dense", "region"), ("se", "region"), ("head.1", "layer")]
    log = proc.stdout + proc.stderr
    assert "4 units (pattern=block)" in log and "dense | region | 3: dense.0, dense.1, dense.2 | 3" in log
    from pdq.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule()
    dm.setup()
    calib = dm.calibration_set(64, 1005)
    overrides = {"seed": 1005, "calib_batch_size": 32, "calib.act_init_size": 32, "iters": 2, "dc_steps": 2,
                 "method.weight_observer.grid": 8}
    qmodel, results = pdq.quantize(model, calib, method="pdquant", bits="w4a4", out_dir=tmp_path / "api", **overrides)
    assert results["unit_table"] == cli["unit_table"] and results["quant_top1"] is None
    assert results["config"]["method"] == cli["config"]["method"]
    assert (tmp_path / "api" / "results.json").is_file()
    # the same engine, settings and seed: the same quantized weights as the command line's run
    saved = torch.load(tmp_path / "cli" / "quantized_model.pt")
    assert all(torch.equal(saved[k], v) for k, v in qmodel.state_dict().items())
    # pdq.load rebuilds the model.target run by itself; the Python-object run needs the architecture again
    import my_models

    from pdq.export.onnx import export_onnx
    from pdq.export.parity import onnx_logits
    from pdq.export.runtime import session

    x = calib[:16]
    with torch.no_grad():
        assert torch.equal(pdq.load(tmp_path / "cli")(x), qmodel.eval()(x))
        assert torch.equal(pdq.load(tmp_path / "api", model=my_models.SENet(width=8))(x), qmodel(x))
        assert torch.allclose(onnx_logits(session(export_onnx(tmp_path / "cli")), x), qmodel(x), atol=1e-3)
    with pytest.raises(PdqError, match="model=<an instance of the float architecture"):
        pdq.load(tmp_path / "api")


def test_python_api_overrides_and_calibration_inputs(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 8, 8))
    images = torch.randn(8, 3, 8, 8)
    with pytest.raises(PdqError, match="'iter' is no setting of the composed config"):
        pdq.quantize(model, images, iter=5)
    with pytest.raises(PdqError, match=r"calib is a torch.int64 tensor of shape \[8\]"):
        pdq.quantize(model, torch.arange(8))
    with pytest.raises(PdqError, match="Could not find 'method/nope'"):
        pdq.quantize(model, images, method="nope")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(8, dtype=torch.long)),
                                         batch_size=4)
    q, r = pdq.quantize(model, loader, method="rtn_minmax", bits="w8a8", eval_data=loader)
    assert r["config"]["calib"]["size"] == 8 and r["eval_images"] == 8 and r["quant_top1"] is not None
    assert r["config"]["quant"]["w_bits"] == 8 and r["unit_table"] == []


def test_plain_override_names_name_one_setting_or_are_refused_naming_the_keys(caplog, monkeypatch):
    """A plain name found at several keys is one setting where the others follow it (`temperature` under
    quant=mixed: method.temperature and quant.temperature follow model.ptq.temperature), whatever the method;
    two different settings (calib.batch_size, quant.batch_size) make it an error. The key set is logged."""
    from pdq.api import compose

    with caplog.at_level(logging.INFO, logger="pdq"):
        cfg, keys = compose("pdquant", "mixed", {"temperature": 2.0, "iters": 3})
    assert keys == {"model.ptq.temperature", "model.ptq.iters"}
    assert (cfg.method.temperature, cfg.quant.temperature, cfg.method.iters) == (2.0, 2.0, 3)
    assert "temperature=...) sets model.ptq.temperature (followed by method.temperature, quant.temperature)" \
        in caplog.text and "iters=...) sets model.ptq.iters (followed by method.iters)" in caplog.text
    assert compose("rtn_mse", "mixed", {"temperature": 2.0})[1] == {"model.ptq.temperature"}
    assert compose("pdquant", "w4a4", {"batch_size": 4, "calib_size": 8})[1] == {"calib.batch_size", "calib.size"}
    monkeypatch.setattr("pdq.pipeline.execute", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(PdqError, match=r"quantize\(..., batch_size=...\): 'batch_size' names 2 different settings "
                                       r"\(calib.batch_size, quant.batch_size\); accepted: the dotted key of the one "
                                       r"meant, e.g. \*\*\{'calib.batch_size': ...\} or calib__batch_size=..."):
        pdq.quantize(nn.Conv2d(3, 4, 3), torch.randn(8, 3, 8, 8), bits="mixed", batch_size=4)


def test_eval_data_forms_and_a_bare_tensor_refused_before_the_work(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 8, 8))
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    _, r = pdq.quantize(model, images, method="rtn_minmax", bits="w8a8", eval_data=(images, labels))
    assert r["eval_images"] == 8 and r["quant_top1"] is not None
    monkeypatch.setattr("pdq.pipeline.execute", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(PdqError, match=r"eval_data is a torch.float32 tensor of shape \[8, 3, 8, 8\] \(images without "
                                       r"labels\); accepted: a DataLoader of \(images, labels\) batches, a Dataset"):
        pdq.quantize(model, images, eval_data=images)
    with pytest.raises(PdqError, match=r"eval_data is a str; accepted"):
        pdq.quantize(model, images, eval_data="/some/folder")


def test_the_callers_model_keeps_its_train_and_eval_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 8, 8))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in training
    modes = [m.training for m in model.modules()]
    pdq.quantize(model, torch.randn(8, 3, 8, 8), method="rtn_minmax", bits="w8a8")
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(PdqError, match="the model does not take"):  # an error after the run put it in eval mode
        pdq.quantize(model, torch.randn(8, 1, 8, 8), method="rtn_minmax", bits="w8a8")
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("case,message", [
    ("channels", r"the model does not take data=fashion_mnist's images: they are \[1, 28, 28\] \(C x H x W\), and its "
                 r"first conv stem.0 takes 3 input channels"),
    ("untrusted", "holds pickled Python objects .* model.trust_checkpoint=true"),
    ("target", "model.target='my_models.Nope': my_models has no class or function 'Nope'; accepted: SENet"),
    ("module", "model.target='nowhere.Net': module 'nowhere' cannot be imported"),
    ("keys", r"does not fit SENet: 2 missing keys: se.3.weight, se.3.bias; 1 unexpected keys: extra; 1 mismatched "
             r"shapes: stem.0.weight \(checkpoint \[8, 3, 3, 3\], model \[8, 1, 3, 3\]\)"),
])
def test_user_model_errors_are_one_clear_line(user_pkg, make_cfg, tmp_path, case, message):
    """In this process (the command line prints a `PdqError` as its one line: tests/run/test_validation.py)."""
    where, model, ckpt = user_pkg
    args = {"channels": ["model.target=my_models.senet", "model.kwargs={in_channels: 3}"],
            "untrusted": ["model.target=my_models.SENet", f"model.checkpoint={tmp_path}/whole.pt"],
            "target": ["model.target=my_models.Nope"], "module": ["model.target=nowhere.Net"],
            "keys": ["model.target=my_models.SENet", f"model.checkpoint={tmp_path}/bad.pt"]}[case]
    torch.save(model, tmp_path / "whole.pt")
    state = dict(model.state_dict(), extra=torch.zeros(1))
    del state["se.3.weight"], state["se.3.bias"]
    state["stem.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(PdqError) as error:
        run(make_cfg("model=custom", *args, *QUICK))
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("target,message", [
    ("TwoInputs", r"the model's forward takes 2 inputs \(x, mask\); accepted: a model whose forward takes one image "
                  r"batch"),
    ("senet_half", r"the model's parameters are float16; accepted: a float32 model \(call model.float\(\)\)"),
])
def test_a_model_with_two_inputs_or_in_float16_is_named_as_such(user_pkg, make_cfg, monkeypatch, target, message):
    """Not as a channel mismatch: from the command line's model.target and from pdq.quantize, as soon as the
    model is built (before it is traced or any data is loaded)."""
    import my_models

    from pdq.pipeline import run

    monkeypatch.setattr("pdq.pipeline.quantize_model", lambda *a, **k: pytest.fail("the model was traced"))
    with pytest.raises(PdqError, match=message):
        run(make_cfg("model=custom", f"model.target=my_models.{target}", *QUICK))
    with pytest.raises(PdqError, match=message):
        pdq.quantize(getattr(my_models, target)(), torch.randn(4, 1, 16, 16), method="rtn_minmax")


def test_whole_module_checkpoint_loads_only_when_trusted(user_pkg, tmp_path):
    where, model, _ = user_pkg
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(PdqError, match="model.trust_checkpoint=true"):
        build_custom(checkpoint=str(tmp_path / "whole.pt"))
    loaded = build_custom(checkpoint=str(tmp_path / "whole.pt"), trust_checkpoint=True)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_torchvision_num_classes_and_in_channels_adapt_stem_and_head(tmp_path):
    torch.manual_seed(0)
    ref = build_model("resnet18", pretrained=False, num_classes=10, in_channels=1)
    assert ref.conv1.in_channels == 1 and ref.fc.out_features == 10
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    model = build_model("resnet18", checkpoint=str(tmp_path / "r18.pt"), num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), ref(x))
    cfg = compose_config("model=resnet18", f"model.checkpoint={tmp_path}/r18.pt", "model.num_classes=10",
                         "model.in_channels=1")
    assert instantiate(cfg.model).conv1.in_channels == 1
    with pytest.raises(PdqError, match="model.in_channels=2 applies to torchvision models only"):
        build_model("resnet20_fmnist", in_channels=2)


# ------------------------------------------------------------------------------------------- your images

def test_folder_data_calibrates_and_evaluates_a_users_images(user_pkg, tmp_path):
    where, model, ckpt = user_pkg
    gen = torch.Generator().manual_seed(0)
    for split, n in (("calib/a", 6), ("calib/b/deeper", 6), ("eval/cat", 3), ("eval/dog", 3)):
        (tmp_path / split).mkdir(parents=True)
        for i in range(n):
            pixels = torch.randint(0, 256, (20, 24, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{i}.png")
    data = ["data=folder", f"data.root={tmp_path}/calib", "data.image_size=16", "data.channels=1", "data.mean=[0.5]",
            "data.std=[0.25]", "calib.size=12", "calib.batch_size=4", "calib.act_init_size=4", "logger=none"]
    model_args = ["model=custom", "model.target=my_models.SENet", f"model.checkpoint={ckpt}", "method=rtn_minmax"]
    proc = run_cli(*model_args, *data, f"data.eval_root={tmp_path}/eval", f"hydra.run.dir={tmp_path}/run", cwd=where)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["eval_images"] == 6 and r["quant_top1"] is not None and r["calib_size"] == 12
    proc = run_cli(*model_args, *data, f"hydra.run.dir={tmp_path}/noeval", cwd=where)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "noeval" / "results.json").read_text())
    assert r["eval_images"] == 0 and r["quant_top1"] is None and "has no evaluation set" in proc.stdout
    proc = run_cli(*model_args, *data, "data.channels=3", f"hydra.run.dir={tmp_path}/rgb", cwd=where)
    assert proc.returncode == 2 and "data.mean=[0.5] is not accepted; accepted: a list of 3 numbers" in proc.stderr
    proc = run_cli(*model_args, *data[:3], "data.channels=3", "data.mean=[0,0,0]", "data.std=[1,1,1]",
                   "calib.size=12", "calib.batch_size=4", "calib.act_init_size=4", f"hydra.run.dir={tmp_path}/ch",
                   cwd=where)
    assert proc.returncode == 2 and "they are [3, 16, 16] (C x H x W), and its first conv stem.0 takes 1 input " \
                                   "channels" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------- README example

def test_readme_python_example_runs(tmp_path):
    """The README's example as it is printed, with fewer steps."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- python-example -->")[1].split("```python")[1].split("```")[0].strip()
    assert len(code.splitlines()) <= 12 and "iters=200" in code and "dc_steps=50" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("iters=200", "iters=2").replace("dc_steps=50", "dc_steps=2"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's pdq, installed or not
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp, quant = map(float, re.findall(r"([0-9.]+)%", proc.stdout))
    assert fp > 90 and 10 < quant <= 100 and (tmp_path / "resnet20_w4a4.pt").is_file()
    assert "unit 11/11 fc" in proc.stderr  # pdq's progress lines, as run.py shows them
