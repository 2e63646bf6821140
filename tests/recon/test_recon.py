"""Reconstruction engine: AdaRound, the schedule, QDrop dropping, and end-to-end runs (determinism,
W2A4 reconstruction against round-to-nearest). Resuming: tests/run/test_resume.py."""


import pytest
import torch

from pdq.pipeline import run
from pdq.quant import ActQuantizer, MinMaxObserver, WeightQuantizer
from pdq.quant.adaround import AdaRoundQuantizer
from pdq.recon.losses import RoundingRegularizer, rounding_penalty
from pdq.recon.module import Caches, UnitReconstruction
from tests.conftest import make_phase


def calibrated_weight_quantizer(w, bits=4):
    q = WeightQuantizer(bits, w.shape[0])
    q.observe(w, MinMaxObserver())
    return q


def test_adaround_init_reproduces_fp_weight_and_hardens_at_half():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w), w)
    s, z = ada.scale, ada.zero_point
    clipped = torch.maximum(torch.minimum(w, (15 - z) * s), -z * s)
    assert torch.allclose(ada(w), clipped, atol=1e-5)  # h(V) = frac(W/s): the soft weight is the clipped FP weight
    assert ((ada(w) - w).abs() > 1e-5).float().mean() < 0.1  # only channel extremes are clipped
    with torch.no_grad():
        ada.alpha.add_(torch.randn_like(ada.alpha))
    h = ada.h().detach()
    ada.harden()
    expected = s * (torch.clamp(torch.floor(w / s) + (h >= 0.5).float() + z, 0, 15) - z)
    assert torch.equal(ada(w), expected)
    assert set(((ada(w) / s + z) % 1).abs().flatten().round(decimals=4).tolist()) <= {0.0, 1.0}


def test_round_loss_and_beta_schedule():
    sched = RoundingRegularizer(1000, warmup=0.2, b_range=(20, 2))
    assert not sched.active(199) and sched.active(200)
    assert (sched.beta(200), sched.beta(600), sched.beta(1000)) == (20, 11, 2)
    w = torch.randn(4, 10)
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w), w)
    with torch.no_grad():
        ada.alpha.fill_(50.0)  # h = 1 everywhere: nothing left to regularise
    assert rounding_penalty(ada.h(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ada.alpha.fill_(0.0)   # h = 0.5: maximal penalty 1 per weight
    assert rounding_penalty(ada.h(), 2.0).item() == pytest.approx(w.numel())


def test_round_loss_is_off_during_warmup():
    w = torch.randn(3, 5)
    layer = torch.nn.Linear(5, 3, bias=False)
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w), w)
    unit = lambda x: torch.nn.functional.linear(x, ada(w))  # noqa: E731
    caches = Caches(torch.randn(16, 5), None, torch.randn(16, 3))
    phase = make_phase("qdrop", iters=10, input_prob=1.0, round_weight=0.5, warmup=0.2)
    module = UnitReconstruction(unit, caches, phase, adarounds=[ada], scales=[], mask_generator=torch.Generator(),
                                log_prefix="u", step_offset=0)
    idx = torch.arange(8)
    assert module.losses(idx)["round_loss"].item() == 0.0  # step 1 (t counts finished steps)
    module.t = 1  # step 2 = warmup * iters: the reference code's counter switches the term on here
    assert module.losses(idx)["round_loss"].item() > 0.0
    assert layer.weight.shape == w.shape


@pytest.mark.parametrize("every,logged", [(3, [3, 6, 7]), (0, [7])])
def test_a_unit_logs_at_the_trainers_cadence_and_its_last_step(make_cfg, every, logged):
    """The loss terms go to the logger every conf/trainer `log_every_n_steps` steps and at the phase's last."""
    from lightning.pytorch.loggers import Logger

    from pdq.errors import instantiate
    from pdq.recon.module import loader

    class Steps(Logger):
        name, version = "steps", 0

        def __init__(self):
            super().__init__()
            self.steps = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if "u/loss" in metrics:
                self.steps.append(step)

    w = torch.randn(3, 5)
    ada = AdaRoundQuantizer(calibrated_weight_quantizer(w), w)
    unit = lambda x: torch.nn.functional.linear(x, ada(w))  # noqa: E731
    phase = make_phase("qdrop", iters=7, input_prob=1.0, drop_prob=1.0)
    module = UnitReconstruction(unit, Caches(torch.randn(16, 5), None, torch.randn(16, 3)), phase, adarounds=[ada],
                                scales=[], mask_generator=torch.Generator(), log_prefix="u", step_offset=0)
    logger = Steps()
    trainer = instantiate(make_cfg(f"trainer.log_every_n_steps={every}").trainer)(
        max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader(16, 8, phase.iters, torch.Generator().manual_seed(0)))
    assert module.t == 7 and logger.steps == logged


def test_qdrop_drops_elementwise_at_rate_p():
    q = ActQuantizer(2)
    x = torch.rand(64, 8, 16, 16) * 3 + 0.1
    q.observe(x, MinMaxObserver())
    xq = ActQuantizer.forward(q, x)
    q.drop_prob, q.generator = 0.5, torch.Generator().manual_seed(0)
    out = q(x)
    differs = xq != x
    quantized = (out == xq) & differs
    rate = quantized.sum().item() / differs.sum().item()
    n = differs.sum().item()
    assert abs(rate - 0.5) < 4 * (0.25 / n) ** 0.5
    assert torch.all((out == xq) | (out == x))
    per_sample = quantized.flatten(1).float().mean(1)
    assert 0.3 < per_sample.min() and per_sample.max() < 0.7  # element-wise, not whole samples


def test_unit_input_mix_is_elementwise():
    caches = Caches(torch.zeros(32, 4, 8, 8), torch.ones(32, 4, 8, 8), torch.zeros(32, 4, 8, 8))
    module = UnitReconstruction(torch.nn.Identity(), caches, make_phase("qdrop", input_prob=0.5), adarounds=[],
                                scales=[], mask_generator=torch.Generator().manual_seed(1), log_prefix="u",
                                step_offset=0)
    x = module.unit_input(torch.arange(32))
    fp_share = x.mean().item()
    assert abs(fp_share - 0.5) < 0.02
    assert 0 < x[0].mean().item() < 1 and 0 < x[:, 0, 0, 0].mean().item() < 1


SHORT = ["model=resnet20_fmnist", "calib.size=128", "calib.act_init_size=64", "data.eval_subset=1000",
         "logger=none"]


def state_of(path):
    return torch.load(path / "quantized_model.pt")


def test_every_unit_runs_exactly_iters_steps_and_dc_is_logged_at_its_first(make_cfg, tmp_path):
    res = run(make_cfg(*SHORT, "method=qdrop_dc", "method.iters=7", "method.dc.steps=2", "quant=w4a4",
                       "logger=csv", "calib.size=64"))
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:]]
    assert steps == sorted(steps)  # one global, increasing step axis

    def logged(column):
        return [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index(column)]]

    assert logged("u01_layer1.0/loss") == [14]  # unit 0 ends at step 7, unit 1 at 14 (logged at its last step)
    assert logged("u01_layer1.0/dc_loss_after") == [8]  # unit 1's DC at its first step
    assert all(u["iters"] == 7 for u in res["units"])


def test_half_precision_caches(make_cfg):
    res = run(make_cfg(*SHORT, "method=pdquant", "method.iters=3", "method.dc.steps=2", "quant=w4a4",
                       "calib.size=64", "calib.cache_dtype=bfloat16"))
    assert len(res["units"]) == 11 and res["quant_top1"] > 50


def test_same_seed_same_reconstruction(make_cfg, tmp_path):
    args = [*SHORT, "method=adaround", "method.iters=15", "quant=w2a4"]
    a = run(make_cfg(*args, f"paths.output_dir={tmp_path / 'a'}"))
    b = run(make_cfg(*args, f"paths.output_dir={tmp_path / 'b'}"))
    assert a["quant_top1"] == b["quant_top1"]
    sa, sb = state_of(tmp_path / "a"), state_of(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [u["name"] for u in a["units"]] == [u["name"] for u in b["units"]] and len(a["units"]) == 22


def test_brecq_runs_two_phases_and_skips_stem_with_brecq_layout(make_cfg, tmp_path):
    res = run(make_cfg(*SHORT, "method=brecq", "method.iters=5", "quant=w4a4", "quant.layout=brecq"))
    phases = [(u["phase"], u["name"]) for u in res["units"]]
    assert phases[0] == (0, "layer1.0") and (1, "layer1.0") in phases and (0, "conv1") not in phases
    assert {"rec_loss", "round_loss"} <= res["units"][0].keys()


def test_w2a4_reconstruction_beats_round_to_nearest(make_cfg, tmp_path):
    common = ["model=resnet20_fmnist", "quant=w2a4", "calib.size=256", "logger=none", "data.eval_subset=2000"]
    rtn = run(make_cfg(*common, "method=rtn_mse", f"paths.output_dir={tmp_path / 'rtn'}"))
    rec = run(make_cfg(*common, "method=qdrop", "method.iters=100", f"paths.output_dir={tmp_path / 'rec'}"))
    assert rec["quant_top1"] > rtn["quant_top1"] + 1.0, (rec["quant_top1"], rtn["quant_top1"])


def cached(engine, work):
    engine.cache(work)
    return work.caches


def test_fp_path_ignores_rounding_written_into_finished_units():
    """Hardening writes the rounded weights of a finished unit into the quantized graph; the FP inputs and
    targets of later units (and the logits) must still come from the float model."""
    from pdq.context import RunContext
    from pdq.models import build_model
    from pdq.quant import LpObserver, quantize_model
    from pdq.quant.state import calibrate_activations, calibrate_weights, full_precision, set_quant_state
    from pdq.recon.engine import ReconstructionEngine, UnitWork
    from pdq.recon.subgraph import prefix
    from pdq.recon.units import find_units

    torch.manual_seed(0)
    model = build_model("resnet20_fmnist")
    gm = quantize_model(model)
    calibrate_weights(gm, MinMaxObserver())
    set_quant_state(gm, weight=True, act=True)
    calib = torch.randn(16, 1, 28, 28)
    calibrate_activations(gm, calib, MinMaxObserver())
    engine = ReconstructionEngine(gm, calib, RunContext(device=torch.device("cpu"), seed=0, batch_size=8,
                                                                 act_init_size=16, cache_dtype=torch.float32,
                                                                 channels_last=False, reconstruct_stem=True,
                                                                 fp_model=model),
                                  LpObserver())
    units = find_units(gm, "block")
    phase = make_phase("qdrop", input_prob=0.5, pd_weight=1.0)
    engine.begin_phase()
    before = cached(engine, UnitWork(0, 3, len(units), units[3], phase, None))
    with torch.no_grad():
        for name in units[1].layers(gm):  # a finished unit: its weights now hold something else
            gm.get_submodule(name).weight.mul_(-2.0)
    engine.begin_phase()  # the inputs cached so far are from before the change
    after = cached(engine, UnitWork(0, 3, len(units), units[3], phase, None))
    assert torch.equal(before.x_fp, after.x_fp) and torch.equal(before.y_fp, after.y_fp)
    assert torch.equal(before.logits, after.logits)
    assert not torch.allclose(before.x_q, after.x_q)  # the quantized path does see the finished unit
    fresh = quantize_model(model)
    with torch.no_grad(), full_precision(fresh):  # and the FP path is the float model's own activation
        reference = prefix(fresh, next(n for n in fresh.graph.nodes if n.name == units[3].input.name))(calib)
    torch.testing.assert_close(after.x_fp, reference, rtol=0, atol=0)
    torch.testing.assert_close(after.logits, model.eval()(calib), rtol=1e-4, atol=1e-4)


def test_learned_weight_scales_move_by_their_lr_and_the_weights_end_on_their_grid(make_cfg, tmp_path):
    """method.learn_weight_scale=true (Genie-M): the weight scales leave the observer's values, each Adam step by
    at most about the YAML's weight_scale_lr, and every layer's weights end on the grid of its learned scale (the
    checkpoint's codes are exact); false keeps the observer's scales."""
    from pdq.pipeline import run

    iters, states = 12, {}
    for learn in (False, True):
        cfg = make_cfg("model=resnet20_fmnist", "method=qdrop", "quant=w2a4", f"method.iters={iters}",
                       f"method.learn_weight_scale={learn}", "calib.size=32", "calib.act_init_size=32",
                       "data.eval_subset=200", "logger=none", "paths.cache_dir=null",
                       f"paths.output_dir={tmp_path / str(learn)}")
        run(cfg)
        states[learn] = torch.load(tmp_path / str(learn) / "quantized_model.pt")
    lr = cfg.method.weight_scale_lr
    scales = [k for k in states[True] if k.endswith("weight_quant.scale")]
    moved = [(states[True][k] - states[False][k]).abs().max().item() for k in scales]
    assert sum(m > 0 for m in moved) >= 0.8 * len(scales) and max(moved) <= 1.5 * iters * lr, moved
    for k in scales:
        layer = k.removesuffix("weight_quant.scale")
        w, z = states[True][layer + "weight"], states[True][layer + "weight_quant.zero_point"]
        codes = w / states[True][k].view(-1, *[1] * (w.dim() - 1)) + z.view(-1, *[1] * (w.dim() - 1))
        assert (codes - codes.round()).abs().max() < 1e-3, layer


def test_a_learned_weight_scale_that_is_not_positive_is_an_error_naming_the_layer():
    from pdq.errors import PdqError
    from pdq.quant.modules import QuantConv2d
    from pdq.quant.state import adaround

    layers = [QuantConv2d.from_float(torch.nn.Conv2d(3, 4, 3), bits=4) for _ in range(2)]
    for layer in layers:
        layer.weight_quant.observe(layer.weight, MinMaxObserver())
    bases = [layer.weight_quant for layer in layers]
    with pytest.raises(PdqError, match=r"reached 0 or below in stem.conv \(-0.5\); accepted.*weight_scale_lr"):
        with adaround(layers, learn_scale=True, names=["stem.conv", "head.conv"]) as adas:
            with torch.no_grad():
                adas[0].scale[1] = -0.5
    assert [layer.weight_quant for layer in layers] == bases  # every layer got its quantizer back
    with pytest.raises(RuntimeError, match="inside"):  # an error inside the block is not replaced by that one
        with adaround(layers, learn_scale=True) as adas:
            with torch.no_grad():
                adas[1].scale[0] = -1.0
            raise RuntimeError("inside")
    assert [layer.weight_quant for layer in layers] == bases
    layer = QuantConv2d.from_float(torch.nn.Conv2d(3, 4, 3), bits=4)
    layer.weight_quant.observe(layer.weight, MinMaxObserver())
    with adaround([layer], learn_scale=True) as (ada,):  # a positive one becomes the layer's quantizer's scale
        with torch.no_grad():
            ada.scale.mul_(1.5)
        learned = ada.scale.detach().reshape(-1).clone()
    assert torch.equal(layer.weight_quant.scale, learned)
