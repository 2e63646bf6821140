import pytest
import torch
import torchvision
from torch import fx, nn

from pdq.errors import PdqError
from pdq.models.fmnist import mobilenetv2_fmnist, resnet20_fmnist
from pdq.quant import act_quant_names, apply_layout, quant_layer_names, quantize_model, set_quant_state
from pdq.quant.fold import fold_bn, fold_bn_into
from pdq.quant.graph import stem_and_head
from tests.conftest import make_layout


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def test_fold_bn_into_matches_conv_then_bn():
    conv, bn = nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8)
    randomize_bn(nn.Sequential(conv, bn))
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert torch.allclose(fold_bn_into(conv, bn)(x), bn(conv(x)), atol=1e-5)


ZOO = [
    (resnet20_fmnist, (2, 1, 28, 28)),
    (mobilenetv2_fmnist, (2, 1, 28, 28)),
    (torchvision.models.resnet18, (2, 3, 64, 64)),
    (torchvision.models.mobilenet_v2, (2, 3, 64, 64)),
    (torchvision.models.regnet_x_400mf, (2, 3, 64, 64)),
    (torchvision.models.mnasnet1_0, (2, 3, 64, 64)),
]


@pytest.mark.parametrize("build,shape", ZOO, ids=[b.__name__ for b, _ in ZOO])
def test_folding_and_wrapping_leave_fp_outputs_unchanged(build, shape):
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(shape)
    folded = fold_bn(fx.symbolic_trace(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    qm = quantize_model(model)
    set_quant_state(qm, weight=False, act=False)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(folded(x), ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(qm(x), ref, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the float model is untouched


def test_resnet20_quantizer_placement():
    qm = quantize_model(resnet20_fmnist())
    acts = act_quant_names(qm)
    # stem output + per block: conv1 output and the block output (after add + ReLU)
    assert len(acts) == 1 + 9 * 2
    assert acts[:3] == ["conv1.aq", "layer1.0.conv1.aq", "layer1.0.aq"]
    assert not any(a.endswith(("conv2.aq", "downsample.0.aq", "fc.aq")) for a in acts)
    assert len(quant_layer_names(qm)) == 1 + 9 * 2 + 2 + 1  # stem, block convs, 2 projections, fc
    assert stem_and_head(qm) == ("conv1", "conv1.aq", "fc", "layer3.2.aq")
    out = [n for n in qm.graph.nodes if n.op == "output"][0]
    assert out.args[0].target == "fc"  # logits are not quantized


def test_inverted_residual_output_quantizer_is_on_the_sum():
    qm = quantize_model(mobilenetv2_fmnist())
    nodes = {n.target: n for n in qm.graph.nodes if n.op == "call_module"}
    # features.1 (t=1, 16->16, stride 1) has a residual: its quantizer follows the add
    assert "features.1.aq" in nodes and "add" in nodes["features.1.aq"].args[0].name
    # features.2 (16->24, stride 2) has none: the projection output itself is quantized
    assert "features.2.conv.2.aq" in nodes and "features.2.aq" not in nodes


@pytest.mark.parametrize("preset,stem_out", [("pdquant", 2), ("brecq", 8)])
def test_layout_presets(preset, stem_out):
    qm = quantize_model(resnet20_fmnist())
    table = make_layout(3, 2, layout=preset, per_layer={"layer2.0.aq": 4}).resolve(qm)
    apply_layout(qm, table)
    assert table["weights"]["conv1"] == 8 and table["weights"]["fc"] == 8
    assert table["weights"]["layer1.0.conv1"] == 3
    assert table["acts"]["conv1.aq"] == stem_out
    assert table["acts"]["layer3.2.aq"] == 8  # FC input
    assert table["acts"]["layer1.0.aq"] == 2 and table["acts"]["layer2.0.aq"] == 4
    assert qm.get_submodule("layer2.0.aq").bits == 4 and qm.get_submodule("conv1").weight_quant.bits == 8


def test_layout_rejects_bad_values():
    qm = quantize_model(resnet20_fmnist())
    with pytest.raises(PdqError, match="quant.layout='foo' is unknown; accepted: pdquant, brecq"):
        make_layout(4, 4, layout="foo")
    with pytest.raises(PdqError, match=r"quant.a_bits=9 .*accepted: an integer 2..8, or 32"):
        make_layout(4, 9)
    with pytest.raises(PdqError, match="names 'nope', which is no quantized layer"):
        make_layout(4, 4, per_layer={"nope": 4}).resolve(qm)
    with pytest.raises(PdqError, match="entry 'conv1=4' is not accepted; accepted: '<layer or"):
        make_layout(4, 4, per_layer=["conv1=4"])
    assert make_layout(4, 4, per_layer=["layer1.0.aq:8", "conv1:3"]).resolve(qm)["acts"]["layer1.0.aq"] == 8


def test_untraceable_model_gets_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(PdqError, match="cannot be traced by torch.fx"):
        quantize_model(Dynamic())
