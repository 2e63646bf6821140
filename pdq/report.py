"""Reports from run dirs: `python -m pdq.report <run or multirun dirs...> [--out DIR] [--curves RUN_DIR]`.

Reads every job dir below the given dirs (a job dir holds `.hydra/` or `results.json`) and writes, atomically,
into `--out` (default: `report/` inside the first dir):

- `table.md`, `table.csv`: the paper's layout, one block per bit setting (W4A4, W2A4, W4A2, W2A2, then
  others), methods as rows, models as columns, mean±std of quantized top-1 over seeds with n;
- `by_model.md`: per model, methods as rows and bit settings as columns (printed to stdout);
- `ablation.md`: qdrop, pd_only, pd_reg, qdrop_dc, pdquant with their PD / Reg / DC components (read from
  each run's config) and the difference to qdrop ("no separation" when it is below the larger seed std);
- `table1.md`: rtn_minmax, rtn_cosine, rtn_mse, pd_scale per (model, bits);
- `top1.png`: top-1 by method and bit setting with std error bars, one panel per model;
- `curves_<run>.png` for each `--curves RUN_DIR`: the per-unit losses from the run's `csv/metrics.csv`.

Runs of one method that differ in iterations, calibration size or evaluation images are separate rows,
labelled e.g. `qdrop (100 it, 256 calib)`. Job dirs without a readable `results.json` (failed, or still
running) are listed under "Missing or failed runs"."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from pdq.io import atomic_write

PAPER_BITS = ["W4A4", "W2A4", "W4A2", "W2A2"]
METHOD_ORDER = ["rtn_minmax", "rtn_cosine", "rtn_mse", "pd_scale", "adaround", "brecq",
                "qdrop", "pd_only", "pd_reg", "qdrop_dc", "pdquant"]
#: column order: the paper's Table 3 models, then the reference models, then any other model by name
MODEL_ORDER = ["resnet18_brecq", "resnet50_brecq", "mobilenetv2_brecq", "regnetx_600m", "regnetx_3200m", "mnasnet_x2",
               "resnet20_fmnist", "mobilenetv2_fmnist"]
ABLATION = ["qdrop", "pd_only", "pd_reg", "qdrop_dc", "pdquant"]
TABLE1 = ["rtn_minmax", "rtn_cosine", "rtn_mse", "pd_scale"]
CURVE_METRICS = ["pd_loss", "rec_loss", "round_loss", "loss"]
LAYOUTS = ["by_model", "paper", "ablation", "table1"]
UNIT_COLUMN = re.compile(r"^u(\d+)_(.+)/([A-Za-z0-9_]+)$")


# ----------------------------------------------------------------------------------------------- reading

def collect(dirs: list[str | Path]) -> tuple[list[dict], list[Path]]:
    """(results, missing): every readable results.json below `dirs` (with `_dir` added), and the job dirs
    (holding `.hydra/` or `results.json`) that have none or an unreadable one. Each job counted once."""
    jobs: set[Path] = set()
    for d in map(Path, dirs):
        jobs |= {p.parent.resolve() for p in d.rglob(".hydra") if p.is_dir()}
        jobs |= {p.parent.resolve() for p in d.rglob("results.json")}
    results, missing = [], []
    for job in sorted(jobs):
        try:
            results.append(json.loads((job / "results.json").read_text()) | {"_dir": str(job)})
        except (OSError, ValueError):
            missing.append(job)
    return results, missing


def missing_note(job: Path) -> str:
    if (job / "results.json").exists():
        return "results.json unreadable"
    files = [p for p in job.rglob("*") if p.is_file()]
    if not files:
        return "no results.json, empty"
    age = time.time() - max(p.stat().st_mtime for p in files)
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return f"no results.json; newest file written {ago} ago"


def missing_lines(missing: list[Path]) -> list[str]:
    return [f"- {job} ({missing_note(job)})" for job in missing]


# ------------------------------------------------------------------------------------------- grouping

def bits(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}"


def bits_key(b: str) -> tuple:
    if b in PAPER_BITS:
        return (0, PAPER_BITS.index(b))
    w, a = (int(x) if x.isdigit() else 0 for x in b[1:].split("A"))
    return (1, -w, -a, b)


def settings(r: dict) -> tuple:
    """What must be equal for runs to be averaged together (besides method, model and bits)."""
    return (r.get("iters", "?"), r.get("calib_size", "?"), r.get("eval_images", "?"))


def method_settings(r: dict) -> dict[str, str]:
    """The run's top-level method keys (`dc.chunk`, `round_lr`, ...) as flat strings; `phases` is left out
    (it repeats them) and so are `name` and `iters` (in the label already)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = json.dumps(value, sort_keys=True)

    method = dict((r.get("config") or {}).get("method") or {})
    for key in ("phases", "name", "iters"):
        method.pop(key, None)
    walk("", method)
    return flat


def label_runs(results: list[dict]) -> None:
    """Set `_label` on every run: the method name, plus its settings where one method has several, plus
    the method keys whose values differ between runs of one method (e.g. `pdquant [dc.chunk=32]`), so
    that runs with other method settings are never averaged together."""
    variants: dict[str, set] = defaultdict(set)
    keys: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    flat = {id(r): method_settings(r) for r in results}
    for r in results:
        variants[r["method"]].add(settings(r))
        for k, v in flat[id(r)].items():  # per model: the per-model settings differ by design
            keys[(r["method"], r["model"])][k].add(v)
    for r in results:
        vs = variants[r["method"]]
        label = r["method"]
        if len(vs) > 1:
            iters, calib, evals = settings(r)
            extra = f", {evals} eval" if len({v[2] for v in vs}) > 1 else ""
            label = f"{label} ({iters} it, {calib} calib{extra})"
        mine = flat[id(r)]
        differing = sorted(k for k, values in keys[(r["method"], r["model"])].items()
                           if len(values) > 1 or k not in mine)
        if differing:
            label += " [" + ", ".join(f"{k}={json.loads(mine[k]) if k in mine else '–'}" for k in differing) + "]"
        r["_label"] = label


def order_key(order: list[str], name: str) -> tuple:
    """Sort key: the position in `order`, then any name not in it, alphabetically."""
    return (order.index(name), "") if name in order else (len(order), name)


def method_key(method: str) -> tuple:
    return order_key(METHOD_ORDER, method)


def model_key(model: str) -> tuple:
    return order_key(MODEL_ORDER, model)


def label_key(runs: list[dict]) -> tuple:
    """Sort key of a row (all runs of one label): paper method order, then settings."""
    r = runs[0]
    return method_key(r["method"]) + tuple(str(s).zfill(12) for s in settings(r))


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


def fp_mean(runs: list[dict]) -> str:
    fp = [r["fp_top1"] for r in runs if r.get("fp_top1") is not None]
    return f"{statistics.mean(fp):.2f}" if fp else "–"


# -------------------------------------------------------------------------------------------- layouts

def by_model(results: list[dict]) -> str:
    """Per model: methods as rows, bit settings as columns, mean ± std over seeds, n, wall time."""
    if not results:
        return "No results.json found.\n"
    label_runs(results)
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
    label_runs(results)
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
                fp = [r["fp_top1"] for r in runs if r.get("fp_top1") is not None]
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


CSV_FIELDS = ["bits", "method", "model", "mean", "std", "n", "seeds", "iters", "calib_size", "fp_top1", "eval_images"]


def components(r: dict) -> tuple[str, str, str]:
    """(PD, Reg, DC) check marks from the run's method config: pd_weight > 0, rec_weight > 0, dc.enabled."""
    m = (r.get("config") or {}).get("method") or {}
    src = m if "pd_weight" in m or "rec_weight" in m else ((m.get("phases") or [{}])[0] or {})

    def mark(v) -> str:
        return "?" if v is None else "✓" if v else "–"
    pd, rec = src.get("pd_weight"), src.get("rec_weight")
    return (mark(None if pd is None else pd > 0), mark(None if rec is None else rec > 0),
            mark((src.get("dc") or {}).get("enabled")))


def columns(results: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["model"], bits(r)) for r in results}, key=lambda c: (model_key(c[0]), bits_key(c[1])))


def ablation_table(results: list[dict]) -> str | None:
    """The paper's ablation: rows qdrop, pd_only, pd_reg, qdrop_dc, pdquant (those present), PD/Reg/DC from the
    configs, one column per (model, bits); then the difference to qdrop run with the same settings."""
    runs = [r for r in results if r["method"] in ABLATION]
    present = {r["method"] for r in runs}
    if "qdrop" not in present or len(present) < 2:
        return None
    label_runs(results)
    cols = columns(runs)
    rows_runs = group(runs, lambda r: r["_label"], components)
    order = sorted(rows_runs, key=lambda k: label_key(rows_runs[k]) + k[1])
    cells = group(runs, lambda r: r["_label"], components, lambda r: (r["model"], bits(r)))
    head = ["method", "PD", "Reg", "DC", *(f"{m} {b}" for m, b in cols)]
    rows = [[label, *comp, *(cell(cells.get((label, comp, c))) for c in cols)] for label, comp in order]
    out = ["# Ablation (quantized top-1 %, mean±std over seeds)", "",
           "PD: pd_weight > 0; Reg: reconstruction term (rec_weight > 0); DC: dc.enabled; read from each run's "
           "config.", "", *md_table(head, rows), "",
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
    label_runs(results)
    cols = columns(runs)
    cells = group(runs, lambda r: r["_label"], lambda r: (r["model"], bits(r)))
    rows = [["FP", *(fp_mean([r for r in runs if r["model"] == m]) for m, _ in cols)]]
    rows += [[label, *(cell(cells.get((label, c))) for c in cols)] for label in ordered_labels(runs)]
    return "\n".join(["# Table 1: activation-scale methods (quantized top-1 %, mean±std over seeds)", "",
                      *md_table(["method", *(f"{m} {b}" for m, b in cols)], rows), ""])


# ---------------------------------------------------------------------------------------------- plots

def _figure(nrows: int, ncols: int, w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_top1(results: list[dict]) -> bytes:
    """Grouped bars: top-1 per bit setting (x) and method (colour), std error bars; one panel per model."""
    from matplotlib import colormaps

    label_runs(results)
    models = sorted({r["model"] for r in results}, key=model_key)
    labels = ordered_labels(results)
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colour = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    ncols = min(len(models), 2)
    fig, axes = _figure((len(models) + ncols - 1) // ncols, ncols, 6.5, 4.0)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        runs = [r for r in results if r["model"] == model]
        bit_cols = sorted({bits(r) for r in runs}, key=bits_key)
        labs = [lab for lab in labels if any(r["_label"] == lab for r in runs)]
        width = 0.8 / len(labs)
        cells = group(runs, lambda r: r["_label"], bits)
        for i, lab in enumerate(labs):
            xs, means, stds = [], [], []
            for j, b in enumerate(bit_cols):
                if (lab, b) in cells:
                    mean, std, _ = stats(cells[(lab, b)])
                    xs.append(j - 0.4 + width * (i + 0.5))
                    means.append(mean)
                    stds.append(std or 0.0)
            ax.bar(xs, means, width, yerr=stds, capsize=2, color=colour[lab], label=lab)
        fp = [r["fp_top1"] for r in runs if r.get("fp_top1") is not None]
        if fp:
            ax.axhline(statistics.mean(fp), color="k", ls="--", lw=1, label="FP")
        ax.set_xticks(range(len(bit_cols)), bit_cols)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
    handles = {}  # one legend for all panels, below them, so that it hides no bar
    for ax in axes.flat[:len(models)]:
        for handle, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, handle)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return _png(fig)


def read_curves(metrics_csv: Path) -> dict[str, dict[tuple[int, str], list[tuple[float, float]]]]:
    """{metric: {(unit index, unit name): [(step, value), ...]}} from a Lightning CSVLogger metrics.csv."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for col, value in row.items():
                m = UNIT_COLUMN.match(col or "")
                if m and value not in (None, "") and step not in (None, ""):
                    curves[m.group(3)][(int(m.group(1)), m.group(2))].append((float(step), float(value)))
    return curves


def plot_curves(run_dir: Path) -> bytes | None:
    """Per-unit pd_loss, rec_loss, round_loss and loss vs global step (one colour per unit); None without data."""
    from matplotlib import colormaps

    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        path = next(iter(sorted(run_dir.rglob("metrics.csv"))), None)
    if path is None:
        return None
    curves = read_curves(path)
    metrics = [m for m in CURVE_METRICS if curves.get(m)]
    if not metrics:
        return None
    units = sorted({u for m in metrics for u in curves[m]})
    cmap = colormaps["tab20" if len(units) <= 20 else "viridis"]
    colour = {u: cmap(i % 20 if len(units) <= 20 else i / max(len(units) - 1, 1)) for i, u in enumerate(units)}
    fig, axes = _figure(1, len(metrics), 4.5, 3.5)
    for ax, metric in zip(axes.flat, metrics):
        for u in units:
            pts = sorted(curves[metric].get(u, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=3, lw=1, color=colour[u],
                        label=f"{u[0]:02d} {u[1]}")
        if all(p[1] > 0 for pts in curves[metric].values() for p in pts):
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("global step")
    title = run_dir.name
    try:
        r = json.loads((run_dir / "results.json").read_text())
        title += f"  ({r['model']} {r['method']} {bits(r)} seed {r.get('seed')}: top-1 {r['quant_top1']:.2f} %)"
    except (OSError, ValueError, KeyError):
        pass
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, title="unit")
    return _png(fig)


# ----------------------------------------------------------------------------------------------- main

def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdq-report", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun dirs (searched recursively for job dirs)")
    ap.add_argument("--out", help="output dir (default: report/ inside the first dir)")
    ap.add_argument("--layout", choices=LAYOUTS, default="by_model",
                    help="table printed to stdout (all are written to --out); default by_model")
    ap.add_argument("--curves", action="append", default=[], metavar="RUN_DIR",
                    help="also plot this run's per-unit loss curves (repeatable)")
    args = ap.parse_args(argv)
    for d in args.dirs + args.curves:
        if not Path(d).is_dir():
            ap.error(f"not a directory: {d}")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"

    results, missing = collect(args.dirs)
    texts = {"by_model": by_model(results)}
    texts["paper"], csv_rows = paper_table(results, missing)
    texts["ablation"], texts["table1"] = ablation_table(results), table1(results)
    written = [atomic_write(out / "table.md", texts["paper"]), atomic_write(out / "table.csv", csv_text(csv_rows)),
               atomic_write(out / "by_model.md", texts["by_model"])]
    for name in ("ablation", "table1"):
        if texts[name] is not None:
            written.append(atomic_write(out / f"{name}.md", texts[name]))
    notes = []
    if results:
        written.append(atomic_write(out / "top1.png", plot_top1(results)))
    for run in map(Path, args.curves):
        png = plot_curves(run)
        if png is None:
            notes.append(f"no per-unit loss curves in {run} (csv/metrics.csv missing or without u<k>_<unit>/ columns)")
        else:
            written.append(atomic_write(out / f"curves_{run.resolve().name}.png", png))

    print(texts[args.layout] if texts[args.layout] is not None else f"(no {args.layout} table: methods not present)")
    if missing:
        print("Missing or failed runs (no results.json):")
        print("\n".join(missing_lines(missing)))
    for note in notes:
        print(note, file=sys.stderr)
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
