import json
import statistics

from pdq.report import collect, main, tables


def write_job(root, name, **res):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    if res:
        base = {"model": "m", "method": "qdrop", "w_bits": 2, "a_bits": 4, "fp_top1": 90.0, "iters": 5,
                "wall_s": 10.0, "eval_images": 100}
        (job / "results.json").write_text(json.dumps(base | res))
    return job


def test_cells_are_mean_and_std_over_seeds_and_missing_jobs_are_listed(tmp_path, capsys):
    for i, top1 in enumerate([50.0, 52.0, 57.0]):
        write_job(tmp_path, f"{i}", quant_top1=top1, seed=i)
    write_job(tmp_path, "3", quant_top1=70.0, seed=0, method="rtn_mse")
    failed = write_job(tmp_path, "4")
    results, missing = collect([tmp_path])
    assert len(results) == 4 and missing == [failed]
    text = tables(results)
    mean, std = statistics.mean([50, 52, 57]), statistics.stdev([50, 52, 57])
    assert f"| qdrop | {mean:.2f} ± {std:.2f} | 3 | 10 |" in text
    assert "| rtn_mse | 70.00 | 1 | 10 |" in text
    main([str(tmp_path)])
    assert str(failed) in capsys.readouterr().out
