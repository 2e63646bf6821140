import configparser
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from pdq.report import (
    ablation_table,
    by_model,
    collect,
    curve_label,
    label_runs,
    main,
    old_components,
    paper_table,
    pareto_series,
    plot_curves,
    read_curves,
    table1,
)
from tests.conftest import ROOT, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def write_job(root, name, method_cfg=None, **res):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    if res:
        base = {"model": "m", "method": "qdrop", "w_bits": 2, "a_bits": 4, "fp_top1": 90.0, "iters": 5,
                "calib_size": 256, "wall_s": 10.0, "eval_images": 100}
        if method_cfg is not None:
            base["config"] = {"method": method_cfg}
        (job / "results.json").write_text(json.dumps(base | res))
    return job


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section(text, title):
    """The lines of Markdown section `## title` (up to the next `## `)."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_cells_are_mean_and_std_over_seeds_and_missing_jobs_are_listed(tmp_path, capsys):
    for i, top1 in enumerate([50.0, 52.0, 57.0]):
        write_job(tmp_path, f"{i}", quant_top1=top1, seed=i)
    write_job(tmp_path, "3", quant_top1=70.0, seed=0, method="rtn_mse", iters=0)
    failed = write_job(tmp_path, "4")
    results, missing = collect([tmp_path, tmp_path / "0"])  # overlapping dirs: each job once
    assert len(results) == 4 and missing == [failed.resolve()]
    label_runs(results)
    text = by_model(results)
    mean, std = statistics.mean([50, 52, 57]), statistics.stdev([50, 52, 57])
    assert f"| qdrop | {mean:.2f} ± {std:.2f} | 3 | 10 |" in text
    assert "| rtn_mse | 70.00 | 1 | 10 |" in text

    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert text in out and str(failed) in out
    report = tmp_path / "report"
    table = (report / "table.md").read_text()
    assert f"| qdrop | {mean:.2f}±{std:.2f} (n=3) |" in section(table, "W2A4")
    assert str(failed) in section(table, "Missing or failed runs")
    assert (report / "by_model.md").read_text() == text
    assert (report / "table1.md").exists() and "| rtn_mse | 70.00 (n=1) |" in (report / "table1.md").read_text()
    assert not (report / "ablation.md").exists()  # no ablation methods besides qdrop
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


def test_mixed_runs_are_columns_of_their_budget_not_of_their_w_bits(tmp_path):
    write_job(tmp_path, "0", quant_top1=60.0, seed=1, w_bits=4)
    for i, top1 in enumerate([70.0, 72.0]):  # a mixed run's w_bits is its width before the allocation
        write_job(tmp_path, f"m{i}", quant_top1=top1, seed=i, w_bits=4, mixed={"budget": {"avg_w_bits": 2.5}})
    write_job(tmp_path, "m2", quant_top1=80.0, seed=1, w_bits=4, mixed={"budget": {"avg_w_bits": 10}})
    write_job(tmp_path, "m3", quant_top1=75.0, seed=1, w_bits=4, mixed={"budget": {"size_mib": 0.05}})
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| qdrop | 60.00 (n=1) |" in section(table, "W4A4")
    assert f"| qdrop | 71.00±{statistics.stdev([70, 72]):.2f} (n=2) |" in section(table, "mixed avg_w_bits=2.5 A4")
    assert "| qdrop | 75.00 (n=1) |" in section(table, "mixed size_mib=0.05 A4")
    header = next(line for line in (tmp_path / "report" / "by_model.md").read_text().splitlines()
                  if line.startswith("| method"))
    assert header.index("W4A4") < header.index("avg_w_bits=2.5") < header.index("avg_w_bits=10") \
        < header.index("size_mib=0.05")  # uniform first, then budgets by kind and value


def test_pareto_table_puts_each_mixed_point_against_the_uniform_line_around_its_size(tmp_path):
    def cost(avg):  # size and BOPs linear in the average width
        return {"avg_w_bits": avg, "size_mib": avg / 1024, "bops": avg * 1e9}

    for i, (w, top1) in enumerate([(2, 60.0), (2, 62.0), (3, 80.0), (4, 90.0)]):
        write_job(tmp_path, f"u{i}", quant_top1=top1, seed=i, w_bits=w, cost=cost(w))
    for i, (avg, top1) in enumerate([(2.5, 75.0), (3.5, 84.0), (6.0, 91.0)]):
        write_job(tmp_path, f"m{i}", quant_top1=top1, seed=i, w_bits=4, cost=cost(avg),
                  mixed={"budget": {"avg_w_bits": avg}})
    write_job(tmp_path, "old", quant_top1=50.0, seed=9, w_bits=8)  # an older pdq's run: no cost, no point
    assert main([str(tmp_path), "--layout", "pareto"]) == 0
    table = (tmp_path / "report" / "pareto.md").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines() if line.startswith("| qdrop")}
    mixed = [("qdrop (mixed)", f"mixed avg_w_bits={avg} A4") for avg in ("2.5", "3.5", "6")]
    assert list(rows) == [("qdrop", "W2A4"), ("qdrop", "W3A4"), ("qdrop", "W4A4"), *mixed]
    assert rows[("qdrop", "W2A4")] == ["2.000", "2.0", "2.0000", f"61.00±{statistics.stdev([60, 62]):.2f} (n=2)", "–"]
    assert rows[mixed[0]][-1] == "+4.50"  # 75 against 61 + (80 - 61) / 2
    assert rows[mixed[1]][-1] == "-1.00"  # 84 against 85
    assert rows[mixed[2]][-1] == "–"  # beyond the widest uniform point
    assert (tmp_path / "report" / "pareto.png").read_bytes()[:8] == PNG


def test_table3_layout_has_the_papers_model_columns_and_method_rows(tmp_path):
    """Models as the paper's Table 3 orders them (not by name), other models after them; methods in paper order."""
    models = ["mnasnet_x2", "zoo_net", "resnet50_brecq", "regnetx_600m", "resnet18_brecq", "mobilenetv2_brecq",
              "regnetx_3200m"]
    for i, model in enumerate(models):
        for method in ("pdquant", "qdrop"):
            write_job(tmp_path, f"{i}_{method}", model=model, method=method, quant_top1=50.0 + i, seed=0)
    assert main([str(tmp_path)]) == 0
    header = section((tmp_path / "report" / "table.md").read_text(), "W2A4").splitlines()[1]
    assert header == ("| method | resnet18_brecq | resnet50_brecq | mobilenetv2_brecq | regnetx_600m | regnetx_3200m "
                      "| mnasnet_x2 | zoo_net |")
    rows = [line.split(" |")[0] for line in section((tmp_path / "report" / "table.md").read_text(), "W2A4").splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| FP", "| qdrop", "| pdquant"]


def test_runs_with_different_iters_or_calib_are_separate_labelled_rows(tmp_path):
    write_job(tmp_path, "a", quant_top1=60.0, seed=1, iters=100)
    write_job(tmp_path, "b", quant_top1=62.0, seed=2, iters=100)
    write_job(tmp_path, "c", quant_top1=70.0, seed=1, iters=200)
    write_job(tmp_path, "d", quant_top1=80.0, seed=1, iters=100, calib_size=1024)
    write_job(tmp_path, "e", quant_top1=50.0, seed=1, method="rtn_mse", iters=0)
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    table = section((tmp_path / "rep" / "table.md").read_text(), "W2A4")
    assert f"| qdrop (100 it, 256 calib) | 61.00±{statistics.stdev([60, 62]):.2f} (n=2) |" in table
    assert "| qdrop (200 it, 256 calib) | 70.00 (n=1) |" in table
    assert "| qdrop (100 it, 1024 calib) | 80.00 (n=1) |" in table
    assert "| rtn_mse | 50.00 (n=1) |" in table  # unambiguous methods keep their plain name
    rows = read_csv(tmp_path / "rep" / "table.csv")
    assert sorted((r["method"], r["iters"], r["calib_size"], r["n"]) for r in rows) == [
        ("qdrop", "100", "1024", "1"), ("qdrop", "100", "256", "2"), ("qdrop", "200", "256", "1"),
        ("rtn_mse", "0", "256", "1")]


def test_runs_with_other_method_settings_are_separate_rows(tmp_path):
    """Same method, iterations and calibration, but another `dc.chunk`: two rows, never one average;
    settings that differ only between models (per-model `ptq:` values) do not split rows."""
    for i, (chunk, top1) in enumerate([(1024, 86.0), (1024, 86.4), (32, 80.0)]):
        write_job(tmp_path, f"r{i}", {"name": "pdquant", "iters": 5, "dc": {"chunk": chunk, "lambda_c": 0.02}},
                  quant_top1=top1, seed=i, method="pdquant")
    write_job(tmp_path, "other_model", {"name": "pdquant", "iters": 5, "dc": {"chunk": 1024, "lambda_c": 0.005}},
              quant_top1=50.0, seed=0, method="pdquant", model="m2")
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "by_model.md").read_text()
    assert f"| pdquant [dc.chunk=1024] | 86.20 ± {statistics.stdev([86.0, 86.4]):.2f} | 2 |" in text
    assert "| pdquant [dc.chunk=32] | 80.00 | 1 |" in text
    assert "| pdquant | 50.00 | 1 |" in text  # model m2: one setting, plain name


def test_runs_written_before_a_method_key_existed_share_the_row_of_its_default(tmp_path):
    """A results.json from before `learn_weight_scale`, `steps` and `unit_merges` ran with their defaults (and
    their lrs, bounds and optimisers played no part): it averages with a run that has the keys at those values,
    and apart from one that turns a switch on."""
    old = {"name": "qdrop", "iters": 5, "round_lr": 0.001}
    new = {**old, "learn_weight_scale": False, "weight_scale_lr": 1e-4, "steps": "uniform", "step_budget": 1.0,
           "step_bounds": [0.25, 2.0], "unit_merges": 0}
    write_job(tmp_path, "old", old, quant_top1=60.0, seed=1)
    write_job(tmp_path, "new", new, quant_top1=62.0, seed=2)
    write_job(tmp_path, "merged", {**new, "unit_merges": 2}, quant_top1=70.0, seed=1)
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "by_model.md").read_text()
    assert f"| qdrop [unit_merges=0] | 61.00 ± {statistics.stdev([60.0, 62.0]):.2f} | 2 |" in text
    assert "| qdrop [unit_merges=2] | 70.00 | 1 |" in text


def qcfg(pd_weight, rec_weight, dc):
    return {"name": "x", "pd_weight": pd_weight, "rec_weight": rec_weight, "dc": {"enabled": dc, "steps": 5}}


def test_ablation_marks_come_from_configs_and_small_differences_are_no_separation(tmp_path):
    runs = {  # method: (config, top-1 per seed)
        "qdrop": (qcfg(0.0, 1.0, False), [60.0, 62.0, 64.0]),     # std 2
        "pd_only": (qcfg(10.0, 0.0, False), [61.0, 63.0, 65.0]),  # +1 < 2: no separation
        "pdquant": (qcfg(10.0, 1.0, True), [70.0, 71.0, 72.0]),   # +9
        "pd_reg": (qcfg(10.0, 1.0, True), [64.0, 65.0, 66.0]),    # named pd_reg but its config enables DC; +3
    }
    for method, (cfg, tops) in runs.items():
        for seed, top1 in enumerate(tops):
            write_job(tmp_path, f"{method}_{seed}", cfg, method=method, quant_top1=top1, seed=seed, a_bits=2)
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "ablation.md").read_text()
    table, delta = text.split("## Δ vs qdrop")
    assert "| method | PD | Reg | DC | m W2A2 |" in table
    assert "| qdrop | – | ✓ | – | 62.00±2.00 (n=3) |" in table
    assert "| pd_only | ✓ | – | – | 63.00±2.00 (n=3) |" in table
    assert "| pd_reg | ✓ | ✓ | ✓ | 65.00±1.00 (n=3) |" in table
    assert "| pdquant | ✓ | ✓ | ✓ | 71.00±1.00 (n=3) |" in table
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ") and "✓" in line]
    assert rows == ["qdrop", "pd_only", "pd_reg", "pdquant"]  # the paper's order
    assert "| pd_only | +1.00, no separation (std 2.00) |" in delta
    assert "| pd_reg | +3.00 |" in delta
    assert "| pdquant | +9.00 |" in delta
    assert "qdrop |" not in delta.split("|---|", 1)[1]


def ablation_jobs(tmp_path, method_cfg=None, **res):
    """qdrop and pdquant jobs (two seeds each) with `method_cfg` as their method config."""
    for method in ("qdrop", "pdquant"):
        for seed in (0, 1):
            write_job(tmp_path, f"{method}_{seed}", method_cfg, method=method, quant_top1=60.0 + seed, seed=seed,
                      **res)


def test_labels_are_computed_once_per_report_and_tables_keep_them(tmp_path, monkeypatch):
    """`main` labels the runs once; the tables and plots use the labels they are given, never recompute them."""
    import pdq.report.cli

    ablation_jobs(tmp_path)
    write_job(tmp_path, "rtn", quant_top1=50.0, seed=0, method="rtn_mse", iters=0)
    calls = []
    monkeypatch.setattr(pdq.report.cli, "label_runs", lambda results: calls.append(1) or label_runs(results))
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert calls == [1]

    results, missing = collect([tmp_path])
    label_runs(results)
    for r in results:
        r["_label"] = f"row {r['method']}"
    texts = [by_model(results), paper_table(results, missing)[0], ablation_table(results), table1(results)]
    assert all("| row " in text for text in texts)
    assert not any(f"| {method} |" in text for text in texts for method in ("qdrop", "pdquant", "rtn_mse"))


@pytest.mark.parametrize("key,where,value,other", [
    ("quant.layout", "quant", "brecq", "pdquant"),
    ("quant.per_layer", "quant", ["conv1:8"], []),
    ("quant.stem_w_bits", "quant", 4, None),
    ("quant.stem_out_bits", "quant", 4, None),
    ("quant.fc_w_bits", "quant", 4, None),
    ("quant.fc_in_bits", "quant", 4, None),
    ("calib.batch_size", "calib", 64, 32),
    ("calib.act_init_size", "calib", 128, 256),
    ("calib.cache_dtype", "calib", "float16", "float32"),
    ("world_size", "results", 2, 1),
])
def test_runs_with_other_quant_calib_or_process_settings_are_separate_rows(tmp_path, key, where, value, other):
    """Each setting that changes a result splits rows where it differs within one method, model and bits; runs
    that agree keep the plain method name; an old results.json (no world_size, no calib.cache_dtype) counts as
    the defaults (1 process, float32)."""
    name = key.split(".")[-1]
    base_cfg = {"quant": {"w_bits": 2, "a_bits": 4, "layout": "pdquant", "per_layer": []},
                "calib": {"size": 256, "batch_size": 32, "act_init_size": 256}}

    def cfg_with(v):
        return base_cfg | {where: base_cfg[where] | {name: v}} if where != "results" else base_cfg

    for seed in (0, 1):
        write_job(tmp_path, f"a{seed}", config=cfg_with(value), quant_top1=70.0 + seed, seed=seed,
                  **({"world_size": value} if where == "results" else {}))
        write_job(tmp_path, f"b{seed}", config=cfg_with(other), quant_top1=60.0 + seed, seed=seed)
        write_job(tmp_path, f"c{seed}", config=cfg_with(value), quant_top1=80.0 + seed, seed=seed, w_bits=4,
                  **({"world_size": value} if where == "results" else {}))
    results, _ = collect([tmp_path])
    label_runs(results)
    labels = {(r["_label"], r["w_bits"]) for r in results}
    assert labels == {(f"qdrop [{key}={value}]", 2), (f"qdrop [{key}={other}]", 2), ("qdrop", 4)}
    text = by_model(results)
    assert f"| qdrop [{key}={value}] | – | 70.50 ± 0.71 |" in text
    assert f"| qdrop [{key}={other}] | – | 60.50 ± 0.71 |" in text
    assert "| qdrop | 80.50 ± 0.71 | – |" in text


def test_runs_whose_phases_differ_are_separate_rows(tmp_path):
    """A phase's own setting (`method.phases.1.rec_p=...`) splits rows; phase values that repeat the method's
    (results.json files of configs whose phases interpolate the method keys) add nothing to the label."""
    def brecq(rec_p, chunk):
        return {"name": "brecq", "iters": 5, "dc": {"chunk": chunk}, "phases": [{"dc": {"chunk": chunk}, "iters": 5},
                                                                              {"rec_p": rec_p}]}
    for i, (rec_p, chunk) in enumerate([(2.4, 1024), (2.0, 1024), (2.4, 32)]):
        write_job(tmp_path, f"b{i}", brecq(rec_p, chunk), method="brecq", quant_top1=50.0 + i, seed=0)
    results, _ = collect([tmp_path])
    label_runs(results)
    assert sorted(r["_label"] for r in results) == ["brecq [dc.chunk=1024, phases.1.rec_p=2.0]",
                                                    "brecq [dc.chunk=1024, phases.1.rec_p=2.4]",
                                                    "brecq [dc.chunk=32, phases.1.rec_p=2.4]"]


def test_ablation_components_come_from_results_json(tmp_path):
    """`components` in results.json decides the PD / Reg / DC marks, not the method config; a results.json
    written before the field existed gets them from its method config, and all false without one."""
    ablation_jobs(tmp_path, qcfg(0.0, 1.0, False), components={"pd": True, "reg": False, "dc": True})
    write_job(tmp_path, "old", qcfg(10.0, 1.0, True), method="pd_reg", quant_top1=61.0, seed=0)
    write_job(tmp_path, "bare", method="qdrop_dc", quant_top1=61.0, seed=0)
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    table = (tmp_path / "rep" / "ablation.md").read_text().split("## Δ vs qdrop")[0]
    assert "| qdrop | ✓ | – | ✓ | 60.50±0.71 (n=2) |" in table
    assert "| pdquant | ✓ | – | ✓ | 60.50±0.71 (n=2) |" in table
    assert "| pd_reg | ✓ | ✓ | ✓ | 61.00 (n=1) |" in table
    assert "| qdrop_dc | – | – | – | 61.00 (n=1) |" in table
    assert old_components({"config": {"method": qcfg(10.0, 0.0, True)}}) == {"pd": True, "reg": False, "dc": True}
    assert old_components({}) == {"pd": False, "reg": False, "dc": False}


@pytest.mark.parametrize("content", ["{}", "[]", '"text"', '{"model": "m", "method": "qdrop"}',
                                     json.dumps({"model": "m", "method": "qdrop", "w_bits": 2, "a_bits": 4, "seed": 0,
                                                 "quant_top1": "high"}),
                                     "{not json"])
def test_results_json_without_the_needed_fields_is_listed_as_unreadable(tmp_path, capsys, content):
    write_job(tmp_path, "good", quant_top1=50.0, seed=0)
    bad = write_job(tmp_path, "bad")
    (bad / "results.json").write_text(content)
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert f"{bad.resolve()} (results.json unreadable)" in capsys.readouterr().out
    table = (tmp_path / "rep" / "table.md").read_text()
    assert f"- {bad.resolve()} (results.json unreadable)" in section(table, "Missing or failed runs")
    assert "| qdrop | 50.00 (n=1) |" in section(table, "W2A4")
    assert (tmp_path / "rep" / "top1.png").read_bytes()[:8] == PNG


def test_curves_keep_units_of_later_phases_apart(tmp_path):
    """BRECQ logs its activation phase as `p1_u<k>_<unit>/...`: those are curves of their own, labelled `p1 ...`."""
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    cols = ["epoch", "step", "u00_conv1/loss", "u01_layer1.0/rec_loss", "p1_u00_conv1/loss",
            "p1_u01_layer1.0/rec_loss"]
    rows = [[0, 0, 1.0, 2.0, "", ""], [0, 1, 0.5, 1.0, "", ""], [0, 2, "", "", 0.4, 0.9], [0, 3, "", "", 0.2, 0.3]]
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([cols, *rows])
    curves = read_curves(run / "csv" / "metrics.csv")
    assert dict(curves["loss"]) == {(0, 0, "conv1"): [(0.0, 1.0), (1.0, 0.5)],
                                    (1, 0, "conv1"): [(2.0, 0.4), (3.0, 0.2)]}
    assert dict(curves["rec_loss"]) == {(0, 1, "layer1.0"): [(0.0, 2.0), (1.0, 1.0)],
                                        (1, 1, "layer1.0"): [(2.0, 0.9), (3.0, 0.3)]}
    assert [curve_label(u) for u in sorted(curves["loss"])] == ["00 conv1", "p1 00 conv1"]
    assert plot_curves(run)[:8] == PNG
    write_job(tmp_path, "job", quant_top1=50.0, seed=0)
    assert main([str(tmp_path / "job"), "--out", str(tmp_path / "rep"), "--curves", str(run)]) == 0
    assert (tmp_path / "rep" / "curves_run.png").read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def tiny_multirun(tmp_path_factory):
    """A real 4-job sweep: rtn_minmax and qdrop (2 iterations per unit), seeds 1 and 2, 200 test images."""
    tmp = tmp_path_factory.mktemp("report")
    sweep = tmp / "sweep"
    proc = run_cli("-m", "method=rtn_minmax,qdrop", "seed=1,2", "model.ptq.iters=2", "calib.size=64",
                   "calib.act_init_size=32", "data.eval_subset=200", "logger=csv", f"hydra.sweep.dir={sweep}",
                   f"paths.cache_dir={tmp / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 4
    return tmp, sweep, jobs


def test_real_multirun_table_cells_plots_and_failed_job(tiny_multirun, capsys):
    tmp, sweep, jobs = tiny_multirun
    other = tmp / "other"
    failed = other / "0_resnet20_fmnist_qdrop_w4a4_s3"  # a job that died before writing results.json
    shutil.copytree(jobs[0] / ".hydra", failed / ".hydra")
    qdrop_job = next(j for j in jobs if "qdrop" in j.name)
    out = tmp / "rep"
    assert main([str(sweep), str(other), "--out", str(out), "--curves", str(qdrop_job)]) == 0
    stdout = capsys.readouterr().out
    assert "Missing or failed runs" in stdout and str(failed.resolve()) in stdout

    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    table = (out / "table.md").read_text()
    assert str(failed.resolve()) in section(table, "Missing or failed runs")
    rows = {r["method"]: r for r in read_csv(out / "table.csv")}
    assert set(rows) == {"rtn_minmax", "qdrop"}
    for method in rows:
        tops = [r["quant_top1"] for r in results if r["method"] == method]
        mean, std = statistics.mean(tops), statistics.stdev(tops)
        assert f"| {method} | {mean:.2f}±{std:.2f} (n=2) |" in section(table, "W4A4")
        row = rows[method]
        assert float(row["mean"]) == pytest.approx(mean) and float(row["std"]) == pytest.approx(std)
        assert (row["bits"], row["model"], row["n"], row["seeds"]) == ("W4A4", "resnet20_fmnist", "2", "1;2")
        assert row["calib_size"] == "64" and row["iters"] == ("2" if method == "qdrop" else "0")
    assert "| rtn_minmax | " in (out / "table1.md").read_text()

    curves = read_curves(qdrop_job / "csv" / "metrics.csv")
    units = json.loads((qdrop_job / "results.json").read_text())["units"]
    assert [name for _, _, name in sorted(curves["loss"])] == [u["name"] for u in units]
    for png in (out / "top1.png", out / f"curves_{qdrop_job.name}.png", out / "pareto.png"):
        data = png.read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    series = pareto_series([{**r, "_label": r["method"]} for r in results])
    assert set(series) == {("resnet20_fmnist", "rtn_minmax"), ("resnet20_fmnist", "qdrop")}
    for (_, method), points in series.items():
        tops = [r["quant_top1"] for r in results if r["method"] == method]
        point, = points  # one bit setting: one point at the layout's size and BOPs
        assert (point.mean, point.std, point.n) == pytest.approx((statistics.mean(tops), statistics.stdev(tops), 2))
        assert point.mib == results[0]["cost"]["size_mib"] and point.setting == "W4A4"
        assert 4 < point.avg_w_bits < 8 and point.avg_w_bits == results[0]["cost"]["avg_w_bits"]  # stem, fc at 8
    assert "| qdrop | W4A4 |" in (out / "pareto.md").read_text()


def test_a_folder_without_runs_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a run")
    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"pdq report: error: no runs in {tmp_path}; accepted: a run dir, a Hydra sweep dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no report/ dir, no tables


def test_console_script_and_module_entry_point(tmp_path):
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "pdq-report = pdq.report:main" in cfg["options.entry_points"]["console_scripts"]
    write_job(tmp_path, "0", quant_top1=50.0, seed=0)
    proc = subprocess.run([sys.executable, "-m", "pdq.report", str(tmp_path), "--layout", "paper"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Quantized top-1 (%)") and "| qdrop | 50.00 (n=1) |" in proc.stdout
    assert (tmp_path / "report" / "top1.png").read_bytes()[:8] == PNG
