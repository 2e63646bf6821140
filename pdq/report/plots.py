"""The plots: `top1.png` (top-1 per model, method and bit setting), `pareto.png` (top-1 against weight size and
BOPs, uniform and mixed precision) and `curves_<run>.png` (per-unit losses)."""

from __future__ import annotations

import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

from pdq.figures import figure, png
from pdq.report.collect import read_results
from pdq.report.labels import bits, bits_key, model_key
from pdq.report.tables import MIXED, fp_values, group, ordered_labels, pareto_series, stats

CURVE_METRICS = ["pd_loss", "rec_loss", "round_loss", "loss"]
#: a per-unit metric column: `u03_layer1.0/rec_loss` (first phase) or `p1_u03_layer1.0/rec_loss` (phase 1, BRECQ's
#: activation phase); groups: phase (absent for the first), unit index, unit name, metric
UNIT_COLUMN = re.compile(r"^(?:p(\d+)_)?u(\d+)_(.+)/([A-Za-z0-9_]+)$")


def plot_top1(results: list[dict]) -> bytes:
    """Grouped bars: top-1 per bit setting (x) and run label (colour), std error bars; one panel per model."""
    from matplotlib import colormaps

    models = sorted({r["model"] for r in results}, key=model_key)
    labels = ordered_labels(results)
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colour = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    ncols = min(len(models), 2)
    fig, axes = figure((len(models) + ncols - 1) // ncols, ncols, 6.5, 4.0)
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
        fp = fp_values(runs)
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
    return png(fig)


def plot_pareto(results: list[dict]) -> bytes | None:
    """Top-1 against weight MiB (left) and GBOPs (right), one row per model, a method's uniform (solid) and mixed
    (dashed) series in one colour; None without runs that record cost."""
    from matplotlib import colormaps

    series = pareto_series(results)
    if not series:
        return None
    models = sorted({model for model, _ in series}, key=model_key)
    methods = sorted({name.removesuffix(MIXED) for _, name in series})
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colour = {method: cmap(i % cmap.N) for i, method in enumerate(methods)}
    fig, axes = figure(len(models), 2, 5.0, 3.6)
    fig.set_layout_engine("constrained")
    for row, model in zip(axes, models):
        for name in sorted(name for m, name in series if m == model):
            points, mixed = series[(model, name)], name.endswith(MIXED)
            for ax, x in zip(row, ("mib", "gbops")):
                ax.errorbar([getattr(p, x) for p in points], [p.mean for p in points], yerr=[p.std for p in points],
                            marker="s" if mixed else "o", ms=4, capsize=2, ls="--" if mixed else "-",
                            color=colour[name.removesuffix(MIXED)], label=name)
        for ax, xlabel in zip(row, ("weight codes (MiB)", "GBOPs (MACs x w bits x a bits)")):
            ax.set_xscale("log", base=2)  # each extra weight bit a similar step
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(model, fontsize=9)
        row[0].legend(fontsize=7)
    return png(fig)


def read_curves(metrics_csv: Path) -> dict[str, dict[tuple[int, int, str], list[tuple[float, float]]]]:
    """{metric: {(phase, unit index, unit name): [(step, value), ...]}} from a Lightning CSVLogger metrics.csv;
    phase 0 is the first (its columns have no `p<k>_` prefix)."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for col, value in row.items():
                m = UNIT_COLUMN.match(col or "")
                if m and value not in (None, "") and step not in (None, ""):
                    unit = (int(m.group(1) or 0), int(m.group(2)), m.group(3))
                    curves[m.group(4)][unit].append((float(step), float(value)))
    return curves


def curve_label(unit: tuple[int, int, str]) -> str:
    """`03 layer1.0` for a first-phase unit, `p1 03 layer1.0` for a later phase's."""
    phase, index, name = unit
    return (f"p{phase} " if phase else "") + f"{index:02d} {name}"


def plot_curves(run_dir: Path) -> bytes | None:
    """Per-unit pd_loss, rec_loss, round_loss and loss vs global step (one colour per unit and phase, later
    phases dashed); None without data."""
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
    fig, axes = figure(1, len(metrics), 4.5, 3.5)
    for ax, metric in zip(axes.flat, metrics):
        for u in units:
            pts = sorted(curves[metric].get(u, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=3, lw=1, color=colour[u],
                        ls="--" if u[0] else "-", label=curve_label(u))
        if all(p[1] > 0 for pts in curves[metric].values() for p in pts):
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("global step")
    title = run_dir.name
    r = read_results(run_dir)
    if r is not None:
        title += f"  ({r['model']} {r['method']} {bits(r)} seed {r['seed']}: top-1 {r['quant_top1']:.2f} %)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, title="unit")
    return png(fig)
