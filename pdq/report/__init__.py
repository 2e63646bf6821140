"""Reports from run dirs: `pdq report <run or multirun dirs...> [--out DIR] [--curves RUN_DIR]`
(or `python -m pdq.report ...`).

Reads every job dir below the given dirs (a job dir holds `.hydra/` or `results.json`) and writes, atomically,
into `--out` (default: `report/` inside the first dir):

- `table.md`, `table.csv`: the paper's layout, one block per bit setting (W4A4, W2A4, W4A2, W2A2, then
  others), methods as rows, models as columns, mean±std of quantized top-1 over seeds with n;
- `by_model.md`: per model, methods as rows and bit settings as columns (printed to stdout);
- `ablation.md`: qdrop, pd_only, pd_reg, qdrop_dc, pdquant with their PD / Reg / DC components (each run's
  `components` in results.json) and the difference to qdrop ("no separation" when it is below the larger seed
  std);
- `table1.md`: rtn_minmax, rtn_cosine, rtn_mse, pd_scale per (model, bits);
- `top1.png`: top-1 by method and bit setting with std error bars, one panel per model;
- `pareto.png`: top-1 against weight size (MiB of codes) and BOPs, one series per method, uniform bit settings
  and `quant=mixed` budgets (dashed) apart, for runs whose results.json records `cost`; `pareto.md`: its points,
  and each mixed point's distance to the straight line between the uniform points around its size;
- `curves_<run>.png` for each `--curves RUN_DIR`: the per-unit losses of every phase from the run's
  `csv/metrics.csv`.

Runs of one method that differ in iterations, calibration or evaluation images are separate rows, labelled
e.g. `qdrop (100 it, 256 calib)`; runs of one method, model and bits that differ in another setting that
changes a result (method keys, `quant.*` overrides, `calib.*`, process count) get it in brackets, e.g.
`pdquant [dc.chunk=32]`. Job dirs without a readable `results.json` (failed, still running, or lacking a
field the tables need) are listed under "Missing or failed runs". Dirs that hold no job dir at all are an error
(exit 2, nothing written).

Modules: `collect` (job dirs, results.json, missing runs), `labels` (run labels and orders), `tables`
(Markdown/CSV tables), `plots` (PNG plots), `cli` (argument parsing and `main`)."""

from pdq.report.cli import main
from pdq.report.collect import collect, old_components, read_results
from pdq.report.labels import label_runs
from pdq.report.plots import curve_label, plot_curves, plot_pareto, plot_top1, read_curves
from pdq.report.tables import ablation_table, by_model, paper_table, pareto_series, pareto_table, table1

__all__ = ["ablation_table", "by_model", "collect", "curve_label", "label_runs", "main", "old_components",
           "paper_table", "pareto_series", "pareto_table", "plot_curves", "plot_pareto", "plot_top1", "read_curves",
           "read_results", "table1"]
