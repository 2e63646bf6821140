"""`pdq report <run or multirun dirs...> [--out DIR] [--layout LAYOUT] [--curves RUN_DIR]`: write the report.

Collects the runs, labels them once, builds every table and plot, writes them atomically into `--out` and
prints the `--layout` table and the missing runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdq.io import atomic_write
from pdq.report.collect import collect, missing_lines
from pdq.report.labels import label_runs
from pdq.report.plots import plot_curves, plot_pareto, plot_top1
from pdq.report.tables import ablation_table, by_model, csv_text, paper_table, pareto_table, table1

LAYOUTS = ["by_model", "paper", "ablation", "table1", "pareto"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdq report", description="Tables and plots from pdq run dirs.")
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
    if not results and not missing:
        print(f"pdq report: error: no runs in {', '.join(args.dirs)}; accepted: a run dir, a Hydra sweep dir or "
              f"any folder holding run dirs (with .hydra/ or results.json); nothing was written", file=sys.stderr)
        return 2
    label_runs(results)
    texts = {"by_model": by_model(results)}
    texts["paper"], csv_rows = paper_table(results, missing)
    texts["ablation"], texts["table1"] = ablation_table(results), table1(results)
    texts["pareto"] = pareto_table(results)
    written = [atomic_write(out / "table.md", texts["paper"]), atomic_write(out / "table.csv", csv_text(csv_rows)),
               atomic_write(out / "by_model.md", texts["by_model"])]
    for name in ("ablation", "table1", "pareto"):
        if texts[name] is not None:
            written.append(atomic_write(out / f"{name}.md", texts[name]))
    notes = []
    if results:
        written.append(atomic_write(out / "top1.png", plot_top1(results)))
        pareto = plot_pareto(results)
        if pareto is not None:
            written.append(atomic_write(out / "pareto.png", pareto))
    for run in map(Path, args.curves):
        png = plot_curves(run)
        if png is None:
            notes.append(f"no per-unit loss curves in {run} (csv/metrics.csv missing or without u<k>_<unit>/ or "
                         "p<j>_u<k>_<unit>/ columns)")
        else:
            written.append(atomic_write(out / f"curves_{run.resolve().name}.png", png))

    print(texts[args.layout] if texts[args.layout] is not None else f"(no {args.layout} table: methods not present)")
    if missing:
        print("Missing or failed runs (no readable results.json):")
        print("\n".join(missing_lines(missing)))
    for note in notes:
        print(note, file=sys.stderr)
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0
