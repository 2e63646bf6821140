"""The Markdown and CSV tables: `by_model`, `paper_table` (table.md / table.csv), `ablation_table`, `table1`,
`pareto_table` (the points of pareto.png).

Every table takes the runs as `collect` returns them, labelled by `label_runs` (it groups rows by `_label`)."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from pdq.report.collect import missing_lines
from pdq.report.labels import bits, bits_key, label_key, model_key, settings

ABLATION = ["qdrop", "pd_only", "pd_reg", "qdrop_dc", "pdquant"]
TABLE1 = ["rtn_minmax", "rtn_cosine", "rtn_mse", "pd_scale"]
#: the suffix of a quant=mixed series in the Pareto plot and table
MIXED = " (mixed)"
CSV_FIELDS = ["bits", "method", "model", "mean", "std", "n", "seeds", "iters", "calib_size", "fp_top1", "eval_images"]


def group(results: list[dict], *keys) -> dict:
    out: dict = defaultdict(list)
    for r in results:
        out[tuple(k(r) for k in keys) if len(keys) > 1 else keys[0](r)].append(r)
    return out


def seed_key(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def stats(runs: list[dict]) -> tuple[float, float | None, int]:
    values = [r["quant_top1"] for r in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def cell(runs: list[dict] | None) -> str:
    """`mean±std (n=k)`; `mean (n=1)`; `–` without runs."""
    if not runs:
        return "–"
    mean, std, n = stats(runs)
    return (f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}") + f" (n={n})"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def ordered_labels(results: list[dict]) -> list[str]:
    by_label = group(results, lambda r: r["_label"])
    return sorted(by_label, key=lambda lab: label_key(by_label[lab]))


def fp_values(runs: list[dict]) -> list[float]:
    return [r["fp_top1"] for r in runs if r.get("fp_top1") is not None]


def fp_mean(runs: list[dict]) -> str:
    fp = fp_values(runs)
    return f"{statistics.mean(fp):.2f}" if fp else "–"


def by_model(results: list[dict]) -> str:
    """Per model: methods as rows, bit settings as columns, mean ± std over seeds, n, wall time."""
    if not results:
        return "No results.json found.\n"
    out = []
    for model, runs in sorted(group(results, lambda r: r["model"]).items(), key=lambda kv: model_key(kv[0])):
        cells = group(runs, lambda r: r["_label"], bits)
        bit_cols = sorted({bits(r) for r in runs}, key=bits_key)
        iters = sorted({str(r.get("iters", "?")) for r in runs})
        evals = sorted({str(r.get("eval_images", "?")) for r in runs})
        out.append(f"**{model}** (FP {fp_mean(runs)} %; quantized top-1 % on {'/'.join(evals)} test images, "
                   f"mean ± std over n seeds; iterations per unit: {', '.join(iters)})\n")
        rows = []
        for label in ordered_labels(runs):
            by_bits = {b: cells[(label, b)] for b in bit_cols if (label, b) in cells}
            ns = sorted({len(rs) for rs in by_bits.values()})
            row = []
            for b in bit_cols:
                if b not in by_bits:
                    row.append("–")
                    continue
                mean, std, n = stats(by_bits[b])
                row.append((f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}")
                           + (f" (n={n})" if len(ns) > 1 else ""))
            wall = [r["wall_s"] for rs in by_bits.values() for r in rs if r.get("wall_s") is not None]
            rows.append([label, *row, "/".join(map(str, ns)), f"{statistics.mean(wall):.0f}" if wall else "–"])
        out += md_table(["method", *bit_cols, "n", "wall s/run"], rows)
        out.append("")
    return "\n".join(out)


def settings_section(results: list[dict]) -> list[str]:
    rows = []
    for label in ordered_labels(results):
        runs = [r for r in results if r["_label"] == label]
        iters, calib, evals = settings(runs[0])
        seeds = sorted({str(r.get("seed")) for r in runs}, key=seed_key)
        rows.append([label, str(iters), str(calib), str(evals), ", ".join(map(str, seeds)), str(len(runs))])
    return ["## Run settings", "", *md_table(["row", "iters/unit", "calib images", "eval images", "seeds", "runs"],
                                              rows), ""]


def paper_table(results: list[dict], missing: list[Path]) -> tuple[str, list[dict]]:
    """(table.md text, table.csv rows): one block per bit setting, methods as rows, models as columns."""
    models = sorted({r["model"] for r in results}, key=model_key)
    cells = group(results, bits, lambda r: r["_label"], lambda r: r["model"])
    out = ["# Quantized top-1 (%)", "",
           "Mean±std over seeds (sample std; n = number of seeds). Runs of one method with different "
           "iterations, calibration or evaluation sizes are separate rows (see Run settings).", ""]
    csv_rows = []
    for b in sorted({bits(r) for r in results}, key=bits_key):
        block = [r for r in results if bits(r) == b]
        rows = [["FP", *(fp_mean([r for r in block if r["model"] == m]) for m in models)]]
        for label in ordered_labels(block):
            rows.append([label, *(cell(cells.get((b, label, m))) for m in models)])
            for m in models:
                runs = cells.get((b, label, m))
                if not runs:
                    continue
                mean, std, n = stats(runs)
                iters, calib, evals = settings(runs[0])
                fp = fp_values(runs)
                csv_rows.append({"bits": b, "method": runs[0]["method"], "model": m, "mean": mean,
                                 "std": "" if std is None else std, "n": n,
                                 "seeds": ";".join(sorted((str(r.get("seed")) for r in runs), key=seed_key)),
                                 "iters": iters, "calib_size": calib, "fp_top1": statistics.mean(fp) if fp else "",
                                 "eval_images": evals})
        out += [f"## {b}", "", *md_table(["method", *models], rows), ""]
    if not results:
        out += ["No results.json found.", ""]
    else:
        out += settings_section(results)
    out += ["## Missing or failed runs", "", *(missing_lines(missing) or ["none"]), ""]
    return "\n".join(out), csv_rows


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def components(r: dict) -> tuple[str, str, str]:
    """(PD, Reg, DC) check marks from the run's `components` (see `collect.read_results`)."""
    c = r["components"]
    return tuple("✓" if c.get(k) else "–" for k in ("pd", "reg", "dc"))


def columns(results: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["model"], bits(r)) for r in results}, key=lambda c: (model_key(c[0]), bits_key(c[1])))


def ablation_table(results: list[dict]) -> str | None:
    """The paper's ablation: rows qdrop, pd_only, pd_reg, qdrop_dc, pdquant (those present), PD/Reg/DC from the
    runs' components, one column per (model, bits); then the difference to qdrop run with the same settings."""
    runs = [r for r in results if r["method"] in ABLATION]
    present = {r["method"] for r in runs}
    if "qdrop" not in present or len(present) < 2:
        return None
    cols = columns(runs)
    rows_runs = group(runs, lambda r: r["_label"], components)
    order = sorted(rows_runs, key=lambda k: label_key(rows_runs[k]) + k[1])
    cells = group(runs, lambda r: r["_label"], components, lambda r: (r["model"], bits(r)))
    head = ["method", "PD", "Reg", "DC", *(f"{m} {b}" for m, b in cols)]
    rows = [[label, *comp, *(cell(cells.get((label, comp, c))) for c in cols)] for label, comp in order]
    out = ["# Ablation (quantized top-1 %, mean±std over seeds)", "",
           "PD: prediction-difference term; Reg: reconstruction regulariser; DC: Distribution Correction; read from "
           "each run's results.json (`components`).", "", *md_table(head, rows), "",
           "## Δ vs qdrop", "",
           "Difference of means to the qdrop row with the same iterations/calibration/evaluation sizes; a difference "
           "smaller than the larger of the two seed stds is reported as no separation, not a win.", ""]
    drows = []
    for label, comp in order:
        first = rows_runs[(label, comp)][0]
        if first["method"] == "qdrop":
            continue
        base = [k for k in order
                if rows_runs[k][0]["method"] == "qdrop" and settings(rows_runs[k][0]) == settings(first)]
        row = [label]
        for c in cols:
            a, q = cells.get((label, comp, c)), (cells.get(base[0] + (c,)) if base else None)
            if not a or not q:
                row.append("–")
                continue
            (ma, sa, _), (mq, sq, _) = stats(a), stats(q)
            delta = ma - mq
            if sa is None or sq is None:
                row.append(f"{delta:+.2f} (n<2: no std, separation unknown)")
            elif abs(delta) < max(sa, sq):
                row.append(f"{delta:+.2f}, no separation (std {max(sa, sq):.2f})")
            else:
                row.append(f"{delta:+.2f}")
        drows.append(row)
    out += [*md_table(["method", *(f"{m} {b}" for m, b in cols)], drows), ""]
    return "\n".join(out)


def table1(results: list[dict]) -> str | None:
    """The paper's Table 1: rtn_minmax, rtn_cosine, rtn_mse, pd_scale (those present) per (model, bits)."""
    runs = [r for r in results if r["method"] in TABLE1]
    if not runs:
        return None
    cols = columns(runs)
    cells = group(runs, lambda r: r["_label"], lambda r: (r["model"], bits(r)))
    rows = [["FP", *(fp_mean([r for r in runs if r["model"] == m]) for m, _ in cols)]]
    rows += [[label, *(cell(cells.get((label, c))) for c in cols)] for label in ordered_labels(runs)]
    return "\n".join(["# Table 1: activation-scale methods (quantized top-1 %, mean±std over seeds)", "",
                      *md_table(["method", *(f"{m} {b}" for m, b in cols)], rows), ""])


class ParetoPoint(NamedTuple):
    """One bit setting or budget of a series: its cost (the runs' mean) and top-1 over its runs."""

    setting: str
    avg_w_bits: float
    mib: float
    gbops: float
    mean: float
    std: float
    n: int


def pareto_series(results: list[dict]) -> dict[tuple[str, str], list[ParetoPoint]]:
    """{(model, series): points by size}; a series is a run label, with ` (mixed)` for quant=mixed runs. Runs
    without `cost` (older pdq) are left out."""
    runs = [r for r in results if r.get("cost") and r.get("quant_top1") is not None]
    series = defaultdict(list)
    cells = group(runs, lambda r: r["model"], lambda r: r["_label"] + (MIXED if r.get("mixed") else ""), bits)
    for (model, name, setting), cell_runs in cells.items():
        mean, std, n = stats(cell_runs)
        cost = {k: statistics.mean(r["cost"][k] for r in cell_runs) for k in ("avg_w_bits", "size_mib", "bops")}
        series[(model, name)].append(ParetoPoint(setting, cost["avg_w_bits"], cost["size_mib"], cost["bops"] / 1e9,
                                                 mean, std or 0.0, n))
    return {key: sorted(points, key=lambda p: (p.mib, p.gbops)) for key, points in series.items()}


def uniform_line(points: list[ParetoPoint], mib: float) -> float | None:
    """Top-1 of the straight line between the two uniform points around `mib` (None outside their range)."""
    for lo, hi in zip(points, points[1:]):
        if lo.mib <= mib <= hi.mib and hi.mib > lo.mib:
            return lo.mean + (hi.mean - lo.mean) * (mib - lo.mib) / (hi.mib - lo.mib)
    return None


def pareto_table(results: list[dict]) -> str | None:
    """pareto.md: per model, every point of pareto.png (cost and top-1), and for a mixed point its distance to the
    straight line between the uniform points of the same label around its size; None without runs with `cost`."""
    series = pareto_series(results)
    if not series:
        return None
    out = ["# Top-1 against weight size and BOPs (uniform and mixed precision)", "",
           "Mean±std over seeds. `vs uniform`: a mixed point's top-1 minus the straight line between the two uniform "
           "settings of the same method around its weight size (points), `–` outside their range.", ""]
    for model in sorted({m for m, _ in series}, key=model_key):
        rows = []
        for name in sorted((n for m, n in series if m == model), key=lambda n: (n.endswith(MIXED), n)):
            uniform = series.get((model, name.removesuffix(MIXED))) if name.endswith(MIXED) else None
            for p in series[(model, name)]:
                line = uniform_line(uniform, p.mib) if uniform else None
                rows.append([name, p.setting, f"{p.avg_w_bits:.3f}", f"{p.mib * 1024:.1f}", f"{p.gbops:.4f}",
                             f"{p.mean:.2f}" + (f"±{p.std:.2f}" if p.n > 1 else "") + f" (n={p.n})",
                             f"{p.mean - line:+.2f}" if line is not None else "–"])
        out += [f"## {model}", "", *md_table(["series", "setting", "avg w bits", "weight KiB", "GBOPs", "top-1 %",
                                               "vs uniform"], rows), ""]
    return "\n".join(out)
