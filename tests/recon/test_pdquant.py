"""PD-Quant pieces: the FP rest of the network, the PD loss, Distribution Correction, and the presets."""

import copy
import math

import pytest
import torch
import torchvision
from torch import fx

from pdq.models.fmnist import mobilenetv2_fmnist, resnet20_fmnist
from pdq.pipeline import run
from pdq.quant import quantize_model, set_quant_state
from pdq.recon import find_units
from pdq.recon.dc import bn_inputs, correct, fp_twin
from pdq.recon.losses import bn_statistics_loss
from pdq.recon.module import Caches, UnitReconstruction
from pdq.recon.subgraph import prefix, segment, suffix
from tests.conftest import make_dc, make_phase
from tests.quant.test_graph import randomize_bn

ZOO = [(resnet20_fmnist, (2, 1, 28, 28)), (mobilenetv2_fmnist, (2, 1, 28, 28)),
       (torchvision.models.resnet18, (2, 3, 64, 64)), (torchvision.models.resnet50, (2, 3, 64, 64)),
       (torchvision.models.mobilenet_v2, (2, 3, 64, 64)), (torchvision.models.regnet_x_400mf, (2, 3, 64, 64)),
       (torchvision.models.mnasnet1_0, (2, 3, 64, 64))]


@pytest.mark.parametrize("build,shape", ZOO, ids=[b.__name__ for b, _ in ZOO])
def test_fp_suffix_of_every_unit_gives_the_model_output(build, shape):
    torch.manual_seed(0)
    model = randomize_bn(build())
    qm = quantize_model(model)
    set_quant_state(qm, weight=False, act=False)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    for unit in find_units(qm):
        rest = suffix(qm, unit.output)
        assert not any(p.requires_grad for p in rest.parameters())
        out = prefix(qm, unit.output)(x).requires_grad_(True)
        logits = rest(out)
        assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max(), unit.name
        logits.sum().backward()
        assert out.grad is not None and out.grad.abs().sum() > 0  # gradients reach the unit output only


@pytest.mark.parametrize("build,shape", ZOO[:2] + ZOO[4:5], ids=[b.__name__ for b, _ in ZOO[:2] + ZOO[4:5]])
def test_unfolded_fp_twin_of_every_unit_matches_the_folded_unit(build, shape):
    torch.manual_seed(0)
    model = randomize_bn(build())
    qm, fp_gm = quantize_model(model), fx.symbolic_trace(copy.deepcopy(model))
    set_quant_state(qm, weight=False, act=False)
    x = torch.randn(shape)
    with torch.no_grad():
        for unit in find_units(qm):
            inp = prefix(qm, unit.input)(x)
            twin, bns = fp_twin(fp_gm, qm, unit)
            ref = segment(qm, unit)(inp)
            assert (twin(inp) - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), unit.name
            assert len(bns) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
            if bns:  # DC's cut: the BatchNorms' inputs, as hooks on the whole twin see them, and nothing after
                seen = []
                hooks = [bn.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0])) for bn in bns]
                twin(inp)
                for h in hooks:
                    h.remove()
                cut, order = bn_inputs(twin, bns)
                assert order == bns and all(torch.equal(a, b) for a, b in zip(cut(inp), seen, strict=True))
                kept = [n for n in cut.graph.nodes if n.op == "call_module"
                        and isinstance(cut.get_submodule(n.target), torch.nn.BatchNorm2d)]
                assert len(kept) < len(bns)  # at least the last BatchNorm's output is not computed


def pd_module(seg, rest, caches, **settings):
    phase = make_phase("pd_reg", input_prob=1.0, temperature=4.0, **settings)
    return UnitReconstruction(seg, caches, phase, adarounds=[], scales=[], mask_generator=torch.Generator(),
                              log_prefix="u", step_offset=0, suffix=rest)


def test_pd_loss_is_zero_for_a_unit_left_in_fp():
    torch.manual_seed(0)
    qm = quantize_model(randomize_bn(resnet20_fmnist()))
    set_quant_state(qm, weight=False, act=False)
    unit = find_units(qm)[4]
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        x_in, logits = prefix(qm, unit.input)(x), qm(x)
        y = segment(qm, unit)(x_in)
    module = pd_module(segment(qm, unit), suffix(qm, unit.output), Caches(x_in, x_in, y, logits))
    terms = module.losses(torch.arange(16))
    assert terms["pd_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["rec_loss"].item() == pytest.approx(0.0, abs=1e-8)
    shifted = Caches(x_in, x_in, y, logits.roll(1, dims=0))
    assert pd_module(segment(qm, unit), suffix(qm, unit.output), shifted).losses(torch.arange(16))["pd_loss"] > 0


def test_dc_lowers_bn_statistics_loss_and_skips_bn_free_units():
    torch.manual_seed(0)
    model = randomize_bn(resnet20_fmnist())
    qm, fp_gm = quantize_model(model), fx.symbolic_trace(copy.deepcopy(model))
    units = find_units(qm)
    twin, bns = fp_twin(fp_gm, qm, units[2])
    assert len(bns) == 2
    x = torch.randn(32, 16, 28, 28).relu()
    corrected, info = correct(twin, bns, x, make_dc(steps=30, lambda_c=0.02, chunk=16))
    assert info["dc_loss_after"] < info["dc_loss_before"]
    captured = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for bn in bns]
    with torch.no_grad():
        twin(x)
        before = bn_statistics_loss(captured, bns).item()
        captured.clear()
        twin(corrected)
        after = bn_statistics_loss(captured, bns).item()
    for h in hooks:
        h.remove()
    assert after < before and corrected.shape == x.shape
    fc_twin, fc_bns = fp_twin(fp_gm, qm, units[-1])
    feats = torch.randn(8, 64)
    same, info = correct(fc_twin, fc_bns, feats, make_dc(steps=30))
    assert fc_bns == [] and same is feats and info == {}


PRESETS = ["pdquant", "pd_only", "pd_reg", "qdrop_dc", "pd_scale", "pdquant_plus"]


@pytest.mark.parametrize("method", PRESETS)
def test_ablation_presets_run_a_few_steps(make_cfg, method, tmp_path):
    res = run(make_cfg("model=mobilenetv2_fmnist" if method == "pdquant" else "model=resnet20_fmnist",
                       f"method={method}", "method.iters=3", "method.dc.steps=2", "quant=w2a2", "calib.size=64",
                       "calib.act_init_size=32", "data.eval_subset=200", "logger=none"))
    assert res["method"] == method and res["units"]
    # pdquant_plus is pdquant with the weight scales learned (docs/results.md): the same keys but that one
    assert res["config"]["method"]["learn_weight_scale"] == (method == "pdquant_plus")
    unit = res["units"][1]
    assert ("pd_loss" in unit) == (method != "qdrop_dc")
    assert ("rec_loss" in unit) == (method not in ("pd_only", "pd_scale"))
    assert ("dc_loss_before" in unit) == (method in ("pdquant", "qdrop_dc", "pdquant_plus"))
    assert ("round_loss" in unit) == (method != "pd_scale")


class _PooledHead(torch.nn.Module):
    """A 1x1 map (conv after global pooling) and a BatchNorm1d head: DC's per-sample std is undefined there."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.mix = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.fc1 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
        self.fc2 = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(self.fc1(torch.flatten(self.mix(self.pool(self.stem(x))), 1)))


def test_pdquant_with_dc_on_batchnorm1d_and_1x1_maps(make_cfg):
    """DC used to raise on a BatchNorm1d input and give NaN on a 1x1 map."""
    from pdq.context import RunContext
    from pdq.errors import instantiate

    torch.manual_seed(0)
    model = randomize_bn(_PooledHead()).eval()
    qm = quantize_model(model)
    cfg = make_cfg("method=pdquant", "method.iters=2", "method.dc.steps=3", "quant=w4a4")
    ctx = RunContext(device=torch.device("cpu"), seed=0, batch_size=8, act_init_size=16, cache_dtype=torch.float32,
                     channels_last=False, reconstruct_stem=True, trainer=instantiate(cfg.trainer), fp_model=model)
    calib = torch.randn(16, 1, 8, 8)
    units = instantiate(cfg.method).quantize(qm, calib, ctx)
    corrected = [u for u in units if "dc_loss_before" in u]
    assert len(corrected) >= 2
    assert all(math.isfinite(u["dc_loss_after"]) for u in corrected) and all(math.isfinite(u["loss"]) for u in units)
    assert torch.isfinite(qm(calib)).all()
