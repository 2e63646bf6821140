"""The paper zoo (pdq/models/paper.py): shapes, parameter counts, BRECQ checkpoint key layout, loading
through `build_model`, reconstruction units (spec §2.3) and the PD-Quant rest-of-network cut."""

import pytest
import torch
import torchvision

from pdq.errors import PdqError
from pdq.models import build_model, known_models
from pdq.quant import quant_layer_names, quantize_model, set_quant_state
from pdq.recon import find_units
from pdq.recon.subgraph import prefix, suffix
from tests.quant.test_graph import randomize_bn

# name: (parameters, reconstruction units). ResNets and MobileNetV2 have exactly the parameters of their
# torchvision twins (same layers, only the module names differ); RegNetX-600MF/3.2GF: 6.2M/15.3M as
# published (torchvision's regnet_x_3_2gf has 15,296,552 too); MNasNet x2 is torchvision's MNASNet(2.0).
# Units (spec §2.3): stem + blocks + head layers: R18 1+8+1, R50 1+16+1, MBV2 1+17+1+1, Reg600 1+16+1,
# Reg3.2G 1+25+1, MNas 3+16+1+1.
ZOO = {
    "resnet18_brecq": (11_689_512, 10),
    "resnet50_brecq": (25_557_032, 18),
    "mobilenetv2_brecq": (3_504_872, 20),
    "regnetx_600m": (6_196_040, 18),
    "regnetx_3200m": (15_296_552, 27),
    "mnasnet_x2": (12_469_944, 21),
}
NAMES = list(ZOO)


def fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model(name, pretrained=False))


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_parameter_count(name):
    model = build_model(name, pretrained=False)
    assert name in known_models() and not model.training
    assert sum(p.numel() for p in model.parameters()) == ZOO[name][0]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_state_dict_keys_are_brecqs():
    # BRECQ's resnet.py (7x7 stem, as its hubconf builds it) and mnasnet.py use torchvision's names
    assert shapes(build_model("resnet18_brecq", pretrained=False)) == shapes(torchvision.models.resnet18())
    assert shapes(build_model("resnet50_brecq", pretrained=False)) == shapes(torchvision.models.resnet50())
    assert shapes(build_model("mnasnet_x2", pretrained=False)) == shapes(torchvision.models.MNASNet(2.0))
    # BRECQ's mobilenetv2.py: flat `conv` Sequential inside each block, conv_bn stems, classifier.1
    mbv2 = shapes(build_model("mobilenetv2_brecq", pretrained=False))
    assert mbv2["features.0.0.weight"] == (32, 3, 3, 3) and mbv2["features.0.1.running_var"] == (32,)
    assert mbv2["features.1.conv.0.weight"] == (32, 1, 3, 3) and mbv2["features.1.conv.3.weight"] == (16, 32, 1, 1)
    assert "features.1.conv.5.weight" not in mbv2  # t=1 block: dw + project only
    assert mbv2["features.2.conv.0.weight"] == (96, 16, 1, 1) and mbv2["features.2.conv.6.weight"] == (24, 96, 1, 1)
    assert mbv2["features.17.conv.7.weight"] == (320,) and mbv2["features.18.0.weight"] == (1280, 320, 1, 1)
    assert mbv2["classifier.1.weight"] == (1000, 1280) and len(mbv2) == 314
    # BRECQ's regnet.py (pycls AnyNet): stem.conv/bn, s<i>.b<j>.proj/bn/f.a/a_bn/b/b_bn/c/c_bn, head.fc
    reg = shapes(build_model("regnetx_600m", pretrained=False))
    assert reg["stem.conv.weight"] == (32, 3, 3, 3) and reg["stem.bn.weight"] == (32,)
    assert reg["s1.b1.proj.weight"] == (48, 32, 1, 1) and reg["s1.b1.bn.running_mean"] == (48,)
    assert reg["s1.b1.f.a.weight"] == (48, 32, 1, 1) and reg["s1.b1.f.b.weight"] == (48, 24, 3, 3)  # 2 groups
    assert reg["s4.b7.f.c_bn.weight"] == (528,) and "s4.b7.proj.weight" not in reg
    assert reg["head.fc.weight"] == (1000, 528)
    big = shapes(build_model("regnetx_3200m", pretrained=False))
    assert big["s3.b15.f.b.weight"] == (432, 48, 3, 3) and big["head.fc.weight"] == (1000, 1008)


@pytest.mark.parametrize("name", NAMES)
def test_release_style_checkpoint_under_model_key_loads(name, tmp_path):
    src = fresh(name)
    path = tmp_path / f"{name}.pth.tar"
    torch.save({"model": src.state_dict()}, path)  # the layout of BRECQ's mobilenetv2.pth.tar
    model = build_model(name, checkpoint=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    with pytest.raises(PdqError, match=r"needs trained weights \(none are bundled\): set model.checkpoint=PATH"):
        build_model(name)


RELEASE = {"resnet18_brecq": "resnet18_imagenet.pth.tar", "resnet50_brecq": "resnet50_imagenet.pth.tar",
           "mobilenetv2_brecq": "mobilenetv2.pth.tar", "regnetx_600m": "regnet_600m.pth.tar",
           "regnetx_3200m": "regnet_3200m.pth.tar", "mnasnet_x2": "mnasnet.pth.tar"}


def test_checkpoint_dir_loads_each_models_release_file_by_its_brecq_name(make_cfg, tmp_path):
    """One folder of BRECQ's release files serves every paper experiment (model.checkpoint_dir=)."""
    from pdq.errors import instantiate

    sources = {}
    for name in ("resnet18_brecq", "mobilenetv2_brecq"):
        sources[name] = fresh(name)
        state = sources[name].state_dict()
        torch.save({"model": state} if name == "mobilenetv2_brecq" else state, tmp_path / RELEASE[name])
    x = torch.randn(2, 3, 64, 64)
    for name, src in sources.items():
        cfg = make_cfg(f"experiment=paper/{name}_w2a2", f"model.checkpoint_dir={tmp_path}", "data.root=/x")
        with torch.no_grad():
            assert torch.equal(instantiate(cfg.model)(x), src(x))
    # model.checkpoint wins over the folder
    other = fresh("resnet18_brecq")
    torch.nn.init.normal_(other.fc.weight)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    model = build_model("resnet18_brecq", checkpoint=str(tmp_path / "other.pt"), checkpoint_dir=str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    with pytest.raises(PdqError, match=r"checkpoint_dir='.*' has no regnet_600m.pth.tar for regnetx_600m"):
        build_model("regnetx_600m", checkpoint_dir=str(tmp_path))
    with pytest.raises(PdqError, match=r"applies to models with a known release file .*resnet18_brecq: "
                                       r"resnet18_imagenet.pth.tar.*; resnet18 loads model.checkpoint=PATH"):
        build_model("resnet18", checkpoint_dir=str(tmp_path))


def test_release_file_names_are_brecqs():
    from pdq.models.registry import RELEASE_FILES

    assert RELEASE_FILES == RELEASE


def test_deep_stem_and_avg_down_resnet_checkpoints_are_recognised(tmp_path):
    # BRECQ's ResNet class also has deep_stem (three 3x3 convs 3->32->32->64) and avg_down shortcuts;
    # a checkpoint saved with them switches the model to that layout: +2 convs and 2 BNs =
    # 3*32*9 + 32*32*9 + 32*64*9 + 2*2*32 - 3*64*49 = 19,232 parameters more than the 7x7 stem
    from pdq.models.paper import resnet18_brecq

    torch.manual_seed(0)
    src = randomize_bn(resnet18_brecq(deep_stem=True, avg_down=True))
    assert sum(p.numel() for p in src.parameters()) == 11_689_512 + 19_232
    path = tmp_path / "resnet18_imagenet.pth.tar"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    model = build_model("resnet18_brecq", checkpoint=str(path))
    assert model.deep_stem and model.avg_down and "layer2.0.downsample.1.weight" in model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert len(find_units(quantize_model(model))) == 12  # the deep stem is 3 layer units


@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_units(name):
    qm = quantize_model(build_model(name, pretrained=False))
    units = find_units(qm, "block")
    assert len(units) == ZOO[name][1]
    assert sorted(layer for u in units for layer in u.layers(qm)) == sorted(quant_layer_names(qm))
    assert units[-1].kind == "layer" and units[1].kind == ("layer" if name == "mnasnet_x2" else "block")
    assert all(u.kind == "block" for u in units if len(u.layers(qm)) > 1)


@pytest.mark.parametrize("name", NAMES)
def test_fp_suffix_of_every_unit_gives_the_model_output(name):
    model = fresh(name)
    qm = quantize_model(model)
    set_quant_state(qm, weight=False, act=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for unit in find_units(qm):
            logits = suffix(qm, unit.output)(prefix(qm, unit.output)(x))
            assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max(), unit.name


PTQ = {  # spec §5.4 / PD-Quant run_script.py: round-loss weight, temperature, lambda_c
    "resnet18_brecq": (0.01, 4.0, 0.02), "resnet50_brecq": (0.01, 4.0, 0.02),
    "mobilenetv2_brecq": (0.1, 1.0, 0.005), "regnetx_600m": (0.01, 4.0, 0.01),
    "regnetx_3200m": (0.01, 4.0, 0.01), "mnasnet_x2": (0.2, 1.0, 0.001),
}


@pytest.mark.parametrize("name", NAMES)
def test_model_configs_carry_the_official_ptq_settings(make_cfg, name):
    cfg = make_cfg(f"model={name}").model
    assert cfg.name == name and cfg.checkpoint is None and cfg.checkpoint_dir is None and "weights" not in cfg
    assert (cfg.ptq.round_weight, cfg.ptq.temperature, cfg.ptq.lambda_c) == PTQ[name]
    assert cfg.ptq.iters == 20000 and cfg.ptq.dc_steps == 500
