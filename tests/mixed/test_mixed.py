"""Mixed precision: the exact allocation (against brute force), budgets, the sensitivity measurement,
`quant=mixed` with every method, a mixed run reproduced from its written allocation, and `pdq sensitivity`."""

import itertools
import json
import random

import pytest
import torch

from pdq.errors import PdqError, instantiate
from pdq.mixed import BUDGETS, LayerCost, MixedLayout, allocate, measure
from pdq.mixed.allocate import spent
from pdq.mixed.cli import main as sensitivity_main
from pdq.models import build_model
from pdq.pipeline import run
from pdq.quant import FakeQuantizer, MinMaxObserver, act_quant_names, quant_layer_names, quantize_model
from tests.conftest import CONF, compose_config

QUICK = ["calib.size=64", "calib.act_init_size=64", "data.eval_subset=64", "logger=none",
         "quant.weight_observer.grid=8", "quant.candidates=[2,4,8]"]


def random_case(rng: random.Random, n: int):
    names = [f"l{i}" for i in range(n)]
    sens = {m: {b: rng.random() / b for b in (2, 3, 4, 8)} for m in names}
    costs = {m: LayerCost(rng.randint(10, 1000), rng.randint(100, 10000), rng.choice([2, 4, 8])) for m in names}
    return names, sens, costs


@pytest.mark.parametrize("budget", BUDGETS)
def test_allocation_is_exact_against_brute_force_and_within_budget(budget):
    rng = random.Random(budget)
    for _ in range(15):
        names, sens, costs = random_case(rng, rng.randint(1, 5))
        fixed = {names[0]: 8} if len(names) > 2 else {}
        lo = spent({m: fixed.get(m, 2) for m in names}, costs, budget)
        hi = spent({m: fixed.get(m, 8) for m in names}, costs, budget)
        value = lo + (hi - lo) * rng.random()
        free = [m for m in names if m not in fixed]
        best = min(sum(sens[m][b] for m, b in zip(free, combo, strict=True))
                   for combo in itertools.product((2, 3, 4, 8), repeat=len(free))
                   if spent({**fixed, **dict(zip(free, combo, strict=True))}, costs, budget) <= value)
        got = allocate(sens, costs, budget, value, fixed)
        assert sum(sens[m][got[m]] for m in free) == pytest.approx(best, abs=1e-12)
        assert spent(got, costs, budget) <= value * (1 + 1e-9) and all(got[m] == b for m, b in fixed.items())


def test_an_impossible_budget_names_the_smallest_feasible_one():
    costs = {"a": LayerCost(100, 1, 8), "b": LayerCost(300, 1, 8)}
    sens = {"a": {2: 1.0, 4: 0.5}, "b": {2: 1.0, 4: 0.5}}
    assert allocate(sens, costs, "avg_w_bits", 2.0) == {"a": 2, "b": 2}
    assert allocate(sens, costs, "avg_w_bits", 2.5) == {"a": 4, "b": 2}  # (100*4 + 300*2) / 400 = 2.5
    with pytest.raises(PdqError, match=r"avg_w_bits=1.9 cannot be met: the smallest feasible budget is 2\b"):
        allocate(sens, costs, "avg_w_bits", 1.9)
    with pytest.raises(PdqError, match=r"the smallest feasible budget is 3.5\b"):  # a fixed at 8: (800+600)/400
        allocate(sens, costs, "avg_w_bits", 3, fixed={"a": 8})


def test_sensitivity_is_zero_at_32_bits_and_grows_as_the_width_shrinks():
    gm = quantize_model(build_model("resnet20_fmnist"))
    images = torch.randn(32, 1, 28, 28)
    table = measure(gm, images, weight_bits=[2, 8, 32], weight_observer=MinMaxObserver(), batch_size=16)
    assert list(table["weights"]) == quant_layer_names(gm)
    for row in table["weights"].values():
        assert row[32] == 0.0 and row[8] >= 0.0
    assert sum(r[2] for r in table["weights"].values()) > 10 * sum(r[8] for r in table["weights"].values())
    assert not any(bool(q.initialized) for q in gm.modules() if isinstance(q, FakeQuantizer))  # measured on a copy


def test_sensitivity_cache_returns_the_measured_table_and_misses_on_any_other_setting(tmp_path, monkeypatch):
    import pdq.mixed.sensitivity as sensitivity

    gm = quantize_model(build_model("resnet20_fmnist"))
    images = torch.randn(16, 1, 28, 28)
    settings = {"weight_bits": [2, 4], "weight_observer": MinMaxObserver(), "batch_size": 16, "skip": {"conv1"}}
    calls = []
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: calls.append(k) or measure(*a, **k))
    table = sensitivity.measure_cached(tmp_path, gm, images, **settings)
    entry, = (tmp_path / "sensitivity").glob("*.json")
    assert sensitivity.measure_cached(tmp_path, gm, images, **settings) == table and len(calls) == 1  # bit for bit
    assert "conv1" not in table["weights"] and all(set(row) == {2, 4} for row in table["weights"].values())
    sensitivity.measure_cached(tmp_path, gm, images, **{**settings, "temperature": 2.0})
    sensitivity.measure_cached(tmp_path, gm, images[:8], **settings)
    assert len(calls) == 3 and len(list((tmp_path / "sensitivity").glob("*.json"))) == 3
    entry.write_text("{not json")  # a broken entry is measured again and rewritten
    assert sensitivity.measure_cached(tmp_path, gm, images, **settings) == table and len(calls) == 4
    assert sensitivity.measure_cached(tmp_path, gm, images, **settings) == table and len(calls) == 4
    assert sensitivity.measure_cached(None, gm, images, **settings) == table and len(calls) == 5  # no cache


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("[!_]*.yaml")))
def test_quant_mixed_composes_with_every_method(method):
    cfg = compose_config("quant=mixed", "quant.budget.size_mib=0.1", f"method={method}")
    layout = instantiate(cfg.quant, _convert_="all")
    assert isinstance(layout, MixedLayout) and (layout.budget_key, layout.budget_value) == ("size_mib", 0.1)
    instantiate(cfg.method)


@pytest.mark.parametrize("overrides,message", [
    ([], "quant=mixed needs a budget"),
    (["quant.budget.avg_w_bits=3", "quant.budget.bops=1e9"], "quant.budget sets avg_w_bits, bops"),
    (["quant.budget.avg_w_bits=-1"], "quant.budget.avg_w_bits=-1"),
    (["quant.budget.avg_w_bits=3", "quant.candidates=[1,4]"], "quant.candidates=1 is not supported"),
    (["++quant.budget.bits=3"], "quant.budget.bits is unknown"),
    (["quant.budget.avg_w_bits=3", "quant.batch_size=0"], "quant.batch_size=0 is not accepted"),
])
def test_bad_mixed_settings_fail_before_the_work(overrides, message, tmp_path):
    with pytest.raises(PdqError, match=message):
        run(compose_config("quant=mixed", *overrides, f"paths.output_dir={tmp_path}"))
    assert not (tmp_path / "sensitivity.csv").exists()


def test_a_mixed_run_is_reproduced_by_its_allocation_passed_back(tmp_path, caplog):
    caplog.set_level("INFO", logger="pdq")
    mixed = run(compose_config("quant=mixed", "quant.budget.avg_w_bits=3", "method=rtn_mse", *QUICK,
                               f"paths.output_dir={tmp_path}/mixed", f"paths.cache_dir={tmp_path}/cache"))
    record = json.loads((tmp_path / "mixed" / "allocation.json").read_text())
    assert record["spent"]["avg_w_bits"] <= 3 and {b for b in record["widths"].values()} <= {2, 4, 8}
    assert mixed["layout"]["weights"] == record["widths"]
    assert mixed["mixed"] == {"budget": {"avg_w_bits": 3}} and mixed["cost"] == pytest.approx(record["spent"])
    rows = (tmp_path / "mixed" / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * (len(record["widths"]) - 2)  # free layers x 3 candidates (stem and fc fixed)
    assert (tmp_path / "mixed" / "sensitivity.png").stat().st_size > 1000
    assert "rtn_mse mixed avg_w_bits=3 A4 top-1" in caplog.text  # not W4A4, its width before the allocation
    # another budget on the same model and images reads the table from the cache
    other = run(compose_config("quant=mixed", "quant.budget.avg_w_bits=4", "method=rtn_mse", *QUICK,
                               f"paths.output_dir={tmp_path}/other", f"paths.cache_dir={tmp_path}/cache"))
    assert caplog.text.count("sensitivity: cached in") == 1 and other["cost"]["avg_w_bits"] > 3
    table = json.loads((tmp_path / "mixed" / "sensitivity.json").read_text())
    assert json.loads((tmp_path / "other" / "sensitivity.json").read_text())["weights"] == table["weights"]
    per_layer = "[" + ",".join(record["per_layer"]) + "]"
    run(compose_config("quant=w4a4", f"quant.per_layer={per_layer}", "method=rtn_mse", *QUICK[:4],
                       f"paths.output_dir={tmp_path}/again", f"paths.cache_dir={tmp_path}/cache"))
    a = torch.load(tmp_path / "mixed" / "quantized_model.pt")
    b = torch.load(tmp_path / "again" / "quantized_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pdq_sensitivity_writes_the_table_and_names_bad_input(tmp_path, capsys):
    assert sensitivity_main(["calib.size=32", "calib.act_init_size=32", "quant.weight_observer.grid=8",
                             "quant.candidates=[2,8]", "quant.act_candidates=[4]", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "sensitivity.json").read_text())
    cfg = compose_config()
    assert table["settings"] == {"temperature": cfg.model.ptq.temperature, "model": "resnet20_fmnist",
                                 "calib_size": 32, "seed": cfg.seed}
    gm = quantize_model(build_model("resnet20_fmnist"))
    assert set(table["fixed"]) == {"conv1", "fc"} and len(table["weights"]) == len(quant_layer_names(gm)) - 2
    assert list(table["acts"]) == act_quant_names(gm)
    assert all(set(row) == {"2", "8"} and row["2"] > row["8"] for row in table["weights"].values())
    assert sensitivity_main(["model=nope", "--out", str(tmp_path / "bad")]) == 2
    assert "Could not find 'model/nope'" in capsys.readouterr().err
