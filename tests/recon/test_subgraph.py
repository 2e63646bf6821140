import pytest
import torch
import torchvision

from pdq.models.fmnist import mobilenetv2_fmnist, resnet20_fmnist
from pdq.quant import quantize_model, set_quant_state
from pdq.recon import find_units
from pdq.recon.subgraph import prefix, segment, suffix

MODELS = [(resnet20_fmnist, (3, 1, 28, 28)), (mobilenetv2_fmnist, (3, 1, 28, 28)),
          (torchvision.models.mnasnet0_5, (2, 3, 64, 64)), (torchvision.models.regnet_x_400mf, (2, 3, 64, 64))]


@pytest.mark.parametrize("build,shape", MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_prefix_segment_suffix_compose_to_the_model(build, shape):
    torch.manual_seed(0)
    qm = quantize_model(build().eval())
    set_quant_state(qm, weight=False, act=False)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = qm(x)
        for unit in find_units(qm):
            inp = prefix(qm, unit.input)(x)
            out = segment(qm, unit)(inp)
            assert torch.allclose(suffix(qm, unit.output)(out), ref, atol=1e-5), unit.name
            assert torch.allclose(prefix(qm, unit.output)(x), out, atol=1e-6), unit.name


def test_pieces_share_modules_with_the_model():
    qm = quantize_model(resnet20_fmnist())
    unit = find_units(qm)[1]
    seg = segment(qm, unit)
    assert seg.get_submodule("layer1.0.conv1") is qm.get_submodule("layer1.0.conv1")
    with pytest.raises(ValueError, match="is not a cut point"):
        inner = next(n for n in unit.nodes if n.target == "layer1.0.conv1")
        suffix(qm, inner)  # the shortcut still reads the block input
