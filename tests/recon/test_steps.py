"""Step policies (`method.steps`, `pdq.recon.steps`): the per-unit budget, the sensitivity it comes from, and a run
that fits each unit for its planned steps."""

import json
import logging
import math

import pytest
import torch

from pdq.errors import PdqError
from pdq.models.fmnist import resnet20_fmnist
from pdq.quant import MinMaxObserver, quantize_model
from pdq.quant.state import calibrate_weights
from pdq.recon import find_units
from pdq.recon.steps import allocate_steps, unit_sensitivity
from tests.conftest import make_phase


@pytest.mark.parametrize("sensitivity", [[1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0], [100.0, 1.0, 1.0, 0.01],
                                         [0.0, 0.0], [3e-7, 0.2, 0.05, 0.07, 2e-5], [1.0, 0.0, 0.0, 0.0]])
@pytest.mark.parametrize("budget, bounds, iters", [(0.5, (0.25, 2.0), 100), (0.5, (0.4, 2.0), 100),
                                                   (1.0, (0.1, 4.0), 100), (1.5, (0.25, 2.0), 100),
                                                   (0.5, (0.25, 2.0), 10)])
def test_steps_spend_the_budget_within_the_bounds_in_the_order_of_the_sensitivity(sensitivity, budget, bounds,
                                                                                   iters):
    """Zeros among the sensitivities (a unit whose quantization changes no logit) take steps only when the others
    cannot take the budget; a lower bound of 2.5 steps means 3."""
    steps = allocate_steps(sensitivity, iters, budget, bounds)
    assert sum(steps) == round(budget * iters * len(sensitivity))
    assert all(math.ceil(bounds[0] * iters) <= n <= bounds[1] * iters for n in steps), steps
    order = sorted(range(len(steps)), key=lambda i: sensitivity[i])
    # more sensitive: no fewer steps (rounding aside)
    assert all(steps[i] <= steps[j] + 1 for i, j in zip(order, order[1:])), (sensitivity, steps)
    if len(set(sensitivity)) == 1:
        assert max(steps) - min(steps) <= 1


def test_an_adaptive_budget_must_lie_within_the_bounds_and_a_unit_may_not_get_zero_steps():
    with pytest.raises(PdqError, match=r"step_bounds=\[0.25, 2.0\] with method.step_budget=0.2 \(method.steps="
                                       r"adaptive\) .*fewest <= step_budget <= most"):
        make_phase("pdquant", steps="adaptive", step_budget=0.2)
    assert make_phase("pdquant", step_budget=0.2).step_budget == 0.2  # uniform: any share > 0
    for bad in ({"steps": "adaptive", "step_budget": 0, "step_bounds": "[0,2]"}, {"step_budget": -1}):
        with pytest.raises(PdqError, match="method.step_budget=.* > 0"):
            make_phase("pdquant", **bad)
    with pytest.raises(PdqError, match=r"step_bounds=\[2.0, 0.25\] .*0 <= fewest <= most"):
        make_phase("pdquant", step_bounds="[2.0,0.25]")
    with pytest.raises(PdqError, match="method.step_bounds=.*two numbers"):
        make_phase("pdquant", step_bounds="[1.0]")
    assert allocate_steps([1.0, 0.0, 0.0], 2, 0.5, (0.0, 2.0)) == [1, 1, 1]  # at least one step each
    assert allocate_steps([float("nan"), 1.0], 100, 1.0, (0.25, 2.0)) == [25, 175]  # not finite: as 0


def test_a_unit_with_other_steps_stretches_its_schedules_and_its_learning_rates_over_them(make_cfg):
    """A unit with a quarter of the steps: its schedules span them and its learning rates are four times the YAML's
    (each variable moves as far in all); the phase itself is left as it was."""
    cfg = make_cfg("method=pdquant", "method.iters=80", "method.learn_weight_scale=true")
    phase = make_phase("pdquant", iters=80, learn_weight_scale="true")
    short = phase.with_steps(20)
    assert (short.iters, short.scale_scheduler.keywords["T_max"]) == (20, 20)
    assert short.round_optimizer.keywords["lr"] == pytest.approx(4 * cfg.method.round_lr)
    assert short.scale_optimizer.keywords["lr"] == pytest.approx(4 * cfg.method.scale_lr)
    assert short.weight_scale_optimizer.keywords["lr"] == pytest.approx(4 * cfg.method.weight_scale_lr)
    assert short.round_optimizer.keywords["fused"] is True and short.pd_weight == phase.pd_weight
    assert (phase.iters, phase.scale_scheduler.keywords["T_max"]) == (80, 80)
    assert phase.round_optimizer.keywords["lr"] == cfg.method.round_lr
    same = phase.with_steps(80)
    assert all(getattr(same, k).keywords == getattr(phase, k).keywords for k in
               ("round_optimizer", "scale_optimizer", "weight_scale_optimizer", "scale_scheduler"))


def test_sensitivity_grows_with_fewer_bits_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    images = torch.randn(32, 1, 28, 28)
    from pdq.quant.observers import LpObserver

    losses = {}
    for bits in (2, 8):
        gm = quantize_model(resnet20_fmnist().eval(), bits=bits)
        calibrate_weights(gm, LpObserver(p=2.0))
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        enabled = [m.enabled for m in gm.modules() if hasattr(m, "enabled")]
        units = find_units(gm)
        losses[bits] = unit_sensitivity(gm, units, images, act_quant=True, act_observer=MinMaxObserver(),
                                        batch_size=16, temperature=1.0)
        assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
        assert [m.enabled for m in gm.modules() if hasattr(m, "enabled")] == enabled
    assert len(losses[2]) == len(units) and all(v >= 0 for v in losses[2])
    assert sum(a > b for a, b in zip(losses[2], losses[8])) >= len(units) - 1, losses


def test_an_adaptive_run_fits_each_unit_for_its_planned_steps(make_cfg, tmp_path, caplog):
    """The run records each unit's sensitivity and steps; the steps add up to the budget, and the plan is logged."""
    from pdq.pipeline import run

    iters = 20
    cfg = make_cfg("model=resnet20_fmnist", "method=qdrop", "quant=w2a4", f"method.iters={iters}",
                   "method.steps=adaptive", "method.step_budget=0.5", "calib.size=32", "calib.act_init_size=32",
                   "data.eval_subset=200",
                   "logger=none", "paths.cache_dir=null", f"paths.output_dir={tmp_path}")
    with caplog.at_level(logging.INFO, logger="pdq"):
        results = run(cfg)
    units = fitted = results["units"]  # a summary per fitted unit
    assert sum(u["iters"] for u in fitted) == round(cfg.method.step_budget * iters * len(fitted))
    lo, hi = (b * iters for b in cfg.method.step_bounds)
    assert all(lo <= u["iters"] <= hi + 1 and u["sensitivity"] >= 0 for u in fitted)
    assert len({u["iters"] for u in fitted}) > 1  # the units differ
    most = max(fitted, key=lambda u: u["sensitivity"])
    assert most["iters"] == max(u["iters"] for u in fitted)
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("steps (method.steps=adaptive"))
    assert f"{most['name']} {most['iters']}" in plan
    assert json.loads((tmp_path / "results.json").read_text())["units"] == units


def test_a_uniform_budget_fits_every_unit_for_its_share_of_the_steps(make_cfg, tmp_path):
    """`method.step_budget=0.5` under `uniform`: every unit half the steps, no sensitivity measured."""
    from pdq.pipeline import run

    results = run(make_cfg("model=resnet20_fmnist", "method=qdrop", "quant=w2a4", "method.iters=10",
                           "method.step_budget=0.5", "calib.size=32", "calib.act_init_size=32", "data.eval_subset=200",
                           "logger=none", "paths.cache_dir=null", f"paths.output_dir={tmp_path}"))
    assert [u["iters"] for u in results["units"]] == [5] * len(results["units"])
    assert not any("sensitivity" in u for u in results["units"])
