"""What makes reconstruction cheaper must not change what it computes: no parameter gradients on the FP paths
and in DC, the DC cache (a hit equals a miss; corrupt entries and other settings miss), incremental unit
inputs (equal to the prefix's), the fused quantizer (equal to `fake_quantize`), QDrop's cheaper masks, and
bf16-mixed precision on CPU. Speed itself is measured by `benchmarks/methods.py`, not here."""

import copy
import functools
import logging
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torchvision

from pdq.models import build_model
from pdq.models.fmnist import mobilenetv2_fmnist, resnet20_fmnist
from pdq.pipeline import run
from pdq.quant import quantize_model
from pdq.quant.adaround import AdaRoundQuantizer, soft_rounding
from pdq.quant.functional import bernoulli_mask, fake_quantize, fake_quantize_fused
from pdq.quant.observers import MinMaxObserver
from pdq.quant.state import calibrate_activations, calibrate_weights
from pdq.recon import find_units
from pdq.recon.dc import DCStore, correct, fp_twin
from pdq.recon.engine import ReconstructionEngine
from pdq.recon.inputs import UnitInputs
from pdq.recon.losses import rounding_penalty
from pdq.recon.module import Caches
from pdq.recon.subgraph import prefix
from tests.conftest import ROOT, glibc, make_dc, transparent_hugepages
from tests.quant.test_graph import randomize_bn
from tests.recon.test_recon import calibrated_weight_quantizer

TINY = ["model=resnet20_fmnist", "calib.size=32", "calib.act_init_size=32", "data.eval_subset=200", "logger=none",
        "method.iters=3", "model.ptq.dc_steps=2", "quant=w2a4", "seed=5"]


# --- fused quantizer and masks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("dropping", [False, True], ids=["all", "qdrop"])
def test_fused_quantizer_matches_the_reference_values_and_gradients(bits, per_channel, dropping):
    g = torch.Generator().manual_seed(bits)
    x0 = torch.randn(8, 6, 5, 5, generator=g) * 0.4 + 0.1
    x0[0] = x0[0].clamp(min=0)  # exact zeros: grid ends hit exactly
    shape = (6, 1, 1) if per_channel else ()  # per channel: axis 1 of x
    scale = (torch.rand(shape, generator=g) * 0.05 + 0.02).requires_grad_(True)  # LSQ: learnable scale
    zero = torch.randint(0, 2 ** bits, shape, generator=g).float()
    keep = (torch.rand(x0.shape, generator=g) < 0.5).float() if dropping else None
    grads = []
    for fn in ("reference", "fused"):
        x = x0.clone().requires_grad_(True)
        if fn == "reference":
            y = fake_quantize(x, scale, zero, bits)
            y = torch.where(keep.bool(), y, x) if dropping else y
        else:
            y = fake_quantize_fused(x, scale, zero, bits, keep)
        (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()  # a gradient that differs per element
        grads.append((y.detach(), x.grad, scale.grad.clone()))
        scale.grad = None
    (y_ref, gx_ref, gs_ref), (y, gx, gs) = grads
    assert torch.equal(y, y_ref)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert torch.allclose(gs, gs_ref, rtol=1e-4, atol=1e-5 * gs_ref.abs().max().item())
    assert gs.abs().sum() > 0 and (gx == 0).any() and (gx != 0).any()  # clipped and passed elements both present


@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_soft_rounding_matches_autograds_formula_values_and_gradients(bits, learn_scale):
    """AdaRound's soft weight as one autograd node (with h(V) for the regulariser) against the formula
    s * (clamp(floor(W/s) + h(V) + z, 0, 2^b - 1) - z), h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1); with a learned
    scale (Genie-M) the gradient for s too (floor's gradient is 0, so the formula's floor stays floor(W/s0))."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 3, 3, generator=g)
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w, bits), w, learn_scale=learn_scale)
    assert ada.learns_scale == learn_scale and isinstance(ada.scale, torch.nn.Parameter) == learn_scale
    with torch.no_grad():
        ada.alpha.mul_(3).add_(torch.randn(ada.alpha.shape, generator=g) * 4)  # h clamped at 0 and 1 somewhere
        ada.alpha[0, 0] = 1e6  # saturated
    s, z = ada.scale, ada.zero_point
    upstream = torch.linspace(-1, 2, w.numel()).view_as(w)
    grads = []
    for fn in ("reference", "fused"):
        if fn == "reference":
            h = torch.clamp(torch.sigmoid(ada.alpha) * 1.2 - 0.1, 0, 1)
            y = s * (torch.clamp(torch.floor(w / s) + h + z, 0, 2 ** bits - 1) - z)
        else:
            with soft_rounding([ada]) as hs:
                y = ada(w)
            (h,) = hs
        ((y * upstream).sum() + rounding_penalty(h, 3.0)).backward()
        grads.append((y.detach(), h.detach(), ada.alpha.grad, ada.scale.grad))
        ada.alpha.grad = ada.scale.grad = None
    (y_ref, h_ref, g_ref, gs_ref), (y, h, g, gs) = grads
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    assert (g == 0).any() and (g != 0).any() and ((h == 0) | (h == 1)).any()
    if learn_scale:
        assert gs.shape == ada.scale.shape and (gs != 0).all()
        assert torch.allclose(gs, gs_ref, rtol=1e-5, atol=1e-6)
    else:
        assert gs is None and gs_ref is None


def test_soft_rounding_backward_through_h_alone():
    """A loss of h(V) only (the weight unused): V's gradient is h's, and a learned scale gets none."""
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w, 4), w, learn_scale=True)
    with soft_rounding([ada]) as hs:
        ada(w)
    hs[0].sum().backward()
    sig = torch.sigmoid(ada.alpha.detach())
    inside = ((sig * 1.2 - 0.1) > 0) & ((sig * 1.2 - 0.1) < 1)
    assert torch.allclose(ada.alpha.grad, 1.2 * sig * (1 - sig) * inside) and ada.scale.grad is None


def test_fused_quantizer_refuses_a_learnable_zero_point():
    with pytest.raises(ValueError, match="zero point"):
        fake_quantize_fused(torch.randn(4), torch.tensor(0.1), torch.tensor(1.0, requires_grad=True), 4)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_bernoulli_mask_has_the_probability_and_the_layout_of_its_input(p):
    like = torch.empty(64, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    mask = bernoulli_mask(like, p, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.float32 and mask.shape == like.shape and mask.stride() == like.stride()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - p) < 0.005
    again = bernoulli_mask(like, p, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    if 0 < p < 1:
        other = bernoulli_mask(like, p, torch.Generator().manual_seed(1))
        assert not torch.equal(mask, other)
        assert abs(mask[:, 0].mean().item() - p) < 0.02  # every channel, not only some
    assert bernoulli_mask(torch.empty(7, 3), p, None).shape == (7, 3)  # odd sizes, default generator


@pytest.mark.parametrize("p", [0.5, 0.25, 0.3, 0.9])
def test_bernoulli_mask_is_exact_beyond_eight_bits(p):
    """0.5 is drawn from one bit per element, 0.25 from 8, 0.3 and 0.9 from 16: with 8 bits they would be 0.3008
    and 0.8984, 0.0008 and 0.0016 off, 7 and 21 standard deviations of the mean over 2^24 draws (the bound: 3.3
    to 5.5)."""
    mask = bernoulli_mask(torch.empty(2 ** 24), p, torch.Generator().manual_seed(3))
    assert abs(mask.mean().item() - p) < 0.0004


@pytest.mark.parametrize("p", [0.5, 0.25, 0.3])
@pytest.mark.parametrize("offset", [1, 2 ** 17])  # neighbours; for p = 0.5, two bits of one random byte
def test_bernoulli_mask_elements_are_independent(p, offset):
    mask = bernoulli_mask(torch.empty(2 ** 20), p, torch.Generator().manual_seed(4))
    both = (mask[:-offset] * mask[offset:]).mean().item()
    assert abs(both - p * p) < 0.003  # 7 standard deviations at p = 0.5, more below; one draw used twice gives p


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_rows_are_the_indexed_rows_in_float32(layout, dtype):
    x = torch.randn(64, 8, 5, 5).to(dtype).contiguous(memory_format=layout)
    caches = Caches(x_q=x, x_fp=None, y_fp=x, logits=torch.randn(64, 10))
    idx = torch.tensor([3, 1, 3, 63, 0])
    rows = caches.rows("x_q", idx)
    assert rows.dtype == torch.float32 and torch.equal(rows, x[idx].float())
    assert rows.is_contiguous(memory_format=layout)
    assert torch.equal(caches.rows("logits", idx), caches.logits[idx])


# --- no parameter gradients -----------------------------------------------------------------------------------------

def test_dc_computes_the_input_gradient_only_even_for_a_twin_with_trainable_weights():
    torch.manual_seed(0)
    model = randomize_bn(resnet20_fmnist()).train(False)  # parameters require grad, as a user's model does
    qm = quantize_model(model)
    unit = find_units(qm)[2]
    twin, bns = fp_twin(torch.fx.symbolic_trace(model), qm, unit)
    x = torch.randn(4, 16, 28, 28)
    out, info = correct(twin, bns, x, make_dc(steps=3, chunk=4))
    assert info["dc_loss_after"] < info["dc_loss_before"]
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(out, x)


def test_reconstruction_leaves_no_parameter_gradient_anywhere(monkeypatch):
    """A PD-Quant run (DC, FP suffix, FP caches): no parameter of the float model, of pdq's FP copies or of the
    quantized model gets a gradient; the user's model keeps its requires_grad flags."""
    import pdq

    engines = []
    real = ReconstructionEngine.run

    def keep(self, phases):
        engines.append(self)
        return real(self, phases)

    monkeypatch.setattr(ReconstructionEngine, "run", keep)
    model = resnet20_fmnist()
    qmodel, results = pdq.quantize(model, torch.randn(32, 1, 28, 28), method="pdquant", bits="w2a4", iters=3,
                                   dc_steps=2, logger="none")
    (engine,) = engines
    assert any("dc_loss_before" in u for u in results["units"])
    for module in (model, engine.fp_graph(), engine.fp_folded(), qmodel):
        assert all(p.grad is None for p in module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in (*engine.fp_graph().parameters(), *engine.fp_folded().parameters()))


# --- DC cache ------------------------------------------------------------------------------------------------------

def _units(results):
    return {u["name"]: u for u in results["units"]}


def test_dc_cache_hit_gives_the_bits_of_a_miss(make_cfg, tmp_path):
    first = run(make_cfg(*TINY, "method=pdquant", f"paths.output_dir={tmp_path / 'a'}"))
    second = run(make_cfg(*TINY, "method=pdquant", f"paths.output_dir={tmp_path / 'b'}"))
    corrected = [n for n, u in _units(first).items() if "dc_loss_before" in u]
    assert corrected and not any(_units(first)[n]["dc_cached"] for n in corrected)
    assert all(_units(second)[n]["dc_cached"] for n in corrected)
    assert all(_units(second)[n]["dc_loss_after"] == _units(first)[n]["dc_loss_after"] for n in corrected)
    a, b = (torch.load(tmp_path / d / "quantized_model.pt") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache" / "dc").glob("*.pt"))) == len(corrected)


def test_dc_cache_is_shared_across_bits_and_methods_but_not_settings_or_seeds(make_cfg, tmp_path):
    run(make_cfg(*TINY, "method=pdquant"))
    hits = lambda *o: [u["dc_cached"] for u in run(make_cfg(*TINY, *o))["units"] if "dc_cached" in u]  # noqa: E731
    assert all(hits("method=qdrop_dc", "quant=w4a4"))
    assert not any(hits("method=pdquant", "method.dc.lr=0.002"))
    assert not any(hits("method=pdquant", "seed=6"))


def test_corrupt_dc_cache_entry_is_recomputed_not_trusted(make_cfg, tmp_path, caplog):
    ref = run(make_cfg(*TINY, "method=pdquant", f"paths.output_dir={tmp_path / 'a'}"))
    entries = sorted((tmp_path / "cache" / "dc").glob("*.pt"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    torch.save({"x": torch.zeros(3), "info": {}}, entries[1])  # whole, but not this unit's tensor
    with caplog.at_level(logging.WARNING, logger="pdq"):
        again = run(make_cfg(*TINY, "method=pdquant", f"paths.output_dir={tmp_path / 'b'}"))
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    assert sorted(u["dc_cached"] for u in again["units"] if "dc_loss_before" in u).count(False) == 2
    a, b = (torch.load(tmp_path / d / "quantized_model.pt") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a) and again["quant_top1"] == ref["quant_top1"]
    assert all(len(torch.load(e, weights_only=True)["x"]) == 32 for e in entries)  # rewritten whole


def test_dc_store_key_covers_model_images_unit_settings_and_layout():
    model = resnet20_fmnist()
    qm = quantize_model(model)
    unit, other_unit = find_units(qm)[1:3]
    images = torch.randn(8, 1, 28, 28)
    kw = dict(batch_size=4, dtype=torch.float32, device=torch.device("cpu"))
    store = DCStore("/nowhere", model, images, **kw)
    dc = make_dc()
    key = store.entry(unit, dc)
    assert key == DCStore("/nowhere", copy.deepcopy(model), images.clone(), **kw).entry(unit, dc)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.conv1.weight[0, 0, 0, 0] += 1e-3
    assert key != DCStore("/nowhere", changed, images, **kw).entry(unit, dc)
    images2 = images.clone()
    images2[3, 0, 5, 5] += 1e-3
    assert key != DCStore("/nowhere", model, images2, **kw).entry(unit, dc)
    assert key != DCStore("/nowhere", model, images, **{**kw, "batch_size": 8}).entry(unit, dc)
    assert key != DCStore("/nowhere", model, images, **{**kw, "dtype": torch.float16}).entry(unit, dc)
    assert key != store.entry(other_unit, dc)
    assert key != store.entry(unit, replace(dc, steps=dc.steps + 1))
    assert key != store.entry(unit, replace(dc, chunk=4))


# --- incremental unit inputs ---------------------------------------------------------------------------------------

def _paper(name):
    return functools.partial(build_model, name, pretrained=False)


ZOO = [(resnet20_fmnist, (6, 1, 28, 28)), (mobilenetv2_fmnist, (6, 1, 28, 28)),
       (torchvision.models.resnet18, (4, 3, 48, 48)), (torchvision.models.mobilenet_v2, (4, 3, 48, 48)),
       (torchvision.models.regnet_x_400mf, (4, 3, 48, 48)), (torchvision.models.mnasnet0_5, (4, 3, 48, 48)),
       (torchvision.models.googlenet, (4, 3, 48, 48)),
       *((_paper(name), (2, 3, 48, 48)) for name in ("resnet18_brecq", "mobilenetv2_brecq", "regnetx_600m",
                                                       "mnasnet_x2"))]
ZOO_IDS = [getattr(b, "__name__", None) or b.args[0] for b, _ in ZOO]


def _calibrated(build, shape):
    torch.manual_seed(0)
    build_kwargs = {"aux_logits": False, "init_weights": True} if build is torchvision.models.googlenet else {}
    qm = quantize_model(randomize_bn(build(**build_kwargs).eval()), bits=4)
    x = torch.randn(shape)
    calibrate_weights(qm, MinMaxObserver())
    calibrate_activations(qm, x, MinMaxObserver())
    return qm, x


@torch.no_grad()
def _in_pairs(module, *xs):
    return torch.cat([module(*(x[i:i + 2] for x in xs)) for i in range(0, len(xs[0]), 2)])


@pytest.mark.parametrize("pattern", ["block", "layer"])
@pytest.mark.parametrize("build,shape", ZOO, ids=ZOO_IDS)
def test_incremental_unit_inputs_equal_the_prefix_path(build, shape, pattern):
    """On the quantized path (weights and activations quantized at 4 bits), every unit's input computed from
    the previous inputs equals the one computed from the images, bit for bit; only the first comes from
    the images (the first unit's input is the images themselves: none), also for layer units inside branches."""
    qm, x = _calibrated(build, shape)
    inputs = UnitInputs(qm, x, _in_pairs, lambda: x)
    units = find_units(qm, pattern)
    for unit in units:
        assert torch.equal(inputs(unit.input.name), _in_pairs(prefix(qm, unit.input), x)), unit.name
    assert inputs.from_prefix == (0 if units[0].input.op == "placeholder" else 1)


@pytest.mark.parametrize("chain", [True, False])
def test_unit_inputs_fall_back_to_the_prefix_when_the_cached_ones_do_not_lead_there(chain):
    qm, x = _calibrated(resnet20_fmnist, (6, 1, 28, 28))
    inputs = UnitInputs(qm, x, _in_pairs, lambda: x, chain=chain)
    units = find_units(qm, "layer")
    order = [units[5], units[2], units[3], units[9], units[1]]  # backwards, forwards, skipping, backwards
    for unit in order:
        assert torch.equal(inputs(unit.input.name), _in_pairs(prefix(qm, unit.input), x)), unit.name
    assert inputs.from_prefix == (4 if chain else 5)  # chained: only the 4th (u3 from u2, no cut)


def test_engine_shares_the_images_and_chains_every_later_input(make_cfg, monkeypatch):
    """The first unit's input is one tensor on both paths (the images as a cache); every later input follows
    from the previous one: no prefix from the images."""
    from_prefix, first = {}, {}
    real = UnitInputs.__call__

    def count(self, name):
        out = real(self, name)
        from_prefix[id(self)] = self.from_prefix
        first.setdefault(id(self), out)
        return out

    monkeypatch.setattr(UnitInputs, "__call__", count)
    results = run(make_cfg(*TINY, "method=qdrop"))
    assert sorted(from_prefix.values()) == [0, 0]  # quantized and FP path
    q, fp = first.values()
    assert q is fp
    assert len(results["units"]) == 11


# --- bf16-mixed ----------------------------------------------------------------------------------------------------

def test_bf16_mixed_precision_runs_a_few_steps_on_cpu(make_cfg):
    results = run(make_cfg(*TINY, "method=pdquant", "trainer.precision=bf16-mixed"))
    assert results["config"]["trainer"]["precision"] == "bf16-mixed"
    losses = [u["loss"] for u in results["units"] if "loss" in u]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert results["quant_top1"] > 10.0


def test_channels_last_is_a_layout_not_a_different_result(make_cfg, tmp_path):
    on = run(make_cfg(*TINY, "method=qdrop", f"paths.output_dir={tmp_path / 'on'}"))
    off = run(make_cfg(*TINY, "method=qdrop", "calib.channels_last=false", f"paths.output_dir={tmp_path / 'off'}"))
    assert on["config"]["calib"]["channels_last"] is True and off["config"]["calib"]["channels_last"] is False
    a, b = (torch.load(tmp_path / d / "quantized_model.pt") for d in ("on", "off"))
    assert all(a[k].is_contiguous() for k in a)  # the quantized model leaves in the default layout
    close = [torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a if "weight" in k]
    assert sum(close) >= 0.9 * len(close)  # float rounding may flip a few roundings, not the result


# --- host memory ----------------------------------------------------------------------------------------------------

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pdq.host_memory import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(12):  # two 64 MiB tensors written and freed per round, as a step's temporaries are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20).fill_(1.0)
    y = x * 2
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))
"""


@pytest.mark.skipif(not glibc(), reason="keep_freed_memory sets glibc's mallopt, and this Python has no glibc")
@pytest.mark.skipif(transparent_hugepages() == "always", reason="with transparent huge pages always on, a 64 MiB "
                    "tensor faults in 2 MiB pages, so the default allocator's 16,384 faults per tensor are not seen")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """Without it, glibc maps every 64 MiB tensor from the kernel (16,384 page faults when it is written); with
    it, freed blocks are reused once the heap holds enough of them (after a few rounds)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True, cwd=ROOT).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 4 * 2 * 16_000 and faults["keep"] < 1_000, faults
