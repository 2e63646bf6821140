"""The state switches of pdq.quant.state: each sets on entry and restores on exit, also after an error."""

import pytest
import torch

from pdq.models.fmnist import resnet20_fmnist
from pdq.quant import ActQuantizer, MinMaxObserver, quantize_model
from pdq.quant.adaround import AdaRoundQuantizer
from pdq.quant.state import (
    act_quantizers,
    adaround,
    calibrate_activations,
    calibrate_weights,
    dropping,
    full_precision,
    learned_scales,
    weight_quantizers,
)


@pytest.fixture
def gm():
    torch.manual_seed(0)
    gm = quantize_model(resnet20_fmnist())
    calibrate_weights(gm, MinMaxObserver())
    calibrate_activations(gm, torch.randn(8, 1, 28, 28), MinMaxObserver())
    return gm


def test_adaround_hardens_into_the_weights_and_gives_the_quantizers_back(gm):
    layers = [gm.get_submodule("layer1.0.conv1"), gm.get_submodule("layer1.0.conv2")]
    bases = [layer.weight_quant for layer in layers]
    expected = [layer.weight_quant(layer.weight).detach() for layer in layers]  # nearest rounding
    with adaround(layers) as adas:
        assert len(adas) == 2 and all(isinstance(layer.weight_quant, AdaRoundQuantizer) for layer in layers)
        with torch.no_grad():
            for ada in adas:
                ada.alpha.copy_(torch.where(ada.h() >= 0.5, 1.0, -1.0))  # keep nearest rounding
    assert [layer.weight_quant for layer in layers] == bases
    for layer, exp in zip(layers, expected):
        assert torch.allclose(layer.weight, exp, atol=1e-6)  # grid values written into the weights
        assert torch.equal(layer.weight_quant(layer.weight), layer.weight.detach())  # idempotent


def test_adaround_restores_after_an_error_and_skips_fp_layers(gm):
    layer, fp = gm.get_submodule("layer1.0.conv1"), gm.get_submodule("layer1.0.conv2")
    fp.weight_quant.bits = 32
    bases = (layer.weight_quant, fp.weight_quant)
    with pytest.raises(RuntimeError), adaround([layer, fp]) as adas:
        assert len(adas) == 1
        raise RuntimeError
    assert (layer.weight_quant, fp.weight_quant) == bases


def test_learned_scales_become_parameters_and_buffers_again(gm):
    acts = act_quantizers(gm)[:3]
    acts[2].bits = 32  # inactive: not learned
    with learned_scales(acts) as params:
        assert len(params) == 2 and all(isinstance(q.scale, torch.nn.Parameter) for q in acts[:2])
        with torch.no_grad():
            params[0].mul_(2)
    assert not any(isinstance(q.scale, torch.nn.Parameter) for q in acts)
    assert "scale" in dict(acts[0].named_buffers()) and acts[0].scale.requires_grad is False


def test_dropping_sets_and_restores(gm):
    acts, gen = act_quantizers(gm), torch.Generator()
    with dropping(acts, 0.5, gen):
        assert all(q.drop_prob == 0.5 and q.generator is gen for q in acts)
        with dropping(acts[:1], 1.0, None):
            assert acts[0].drop_prob == 1.0 and acts[1].drop_prob == 0.5
        assert acts[0].drop_prob == 0.5 and acts[0].generator is gen
    assert all(q.drop_prob == 1.0 and q.generator is None for q in acts)


def test_full_precision_restores_each_switch(gm):
    quantizers = weight_quantizers(gm) + act_quantizers(gm)
    quantizers[0].enabled = False
    with full_precision(gm):
        assert not any(q.enabled for q in quantizers)
    assert [q.enabled for q in quantizers] == [False] + [True] * (len(quantizers) - 1)
    assert isinstance(quantizers[-1], ActQuantizer)
