"""Tables from run dirs: `python -m pdq.report outputs/multiruns/... [more dirs]`.

Reads every `results.json` below the given dirs and prints, per model, a Markdown table with methods as
rows and bit settings as columns: mean ± std of quantized top-1 over seeds (n = seeds), plus the mean
wall time per run. Job dirs (those holding `.hydra/`) without a `results.json` are listed as missing."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

BIT_ORDER = ["w8a8", "w4a4", "w2a4", "w4a2", "w3a3", "w2a2", "w8a2"]


def collect(dirs: list[str | Path]) -> tuple[list[dict], list[Path]]:
    results, missing = [], []
    for d in map(Path, dirs):
        for job in sorted({p.parent for p in d.rglob(".hydra")} | {p.parent for p in d.rglob("results.json")}):
            path = job / "results.json"
            if path.exists():
                results.append(json.loads(path.read_text()) | {"_dir": str(job)})
            else:
                missing.append(job)
    return results, missing


def summarize(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def tables(results: list[dict]) -> str:
    cells: dict[str, dict[str, dict[str, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        cells[r["model"]][r["method"]][f"w{r['w_bits']}a{r['a_bits']}"].append(r)
    out = []
    for model, methods in sorted(cells.items()):
        bits = sorted({b for m in methods.values() for b in m},
                      key=lambda b: (BIT_ORDER.index(b) if b in BIT_ORDER else len(BIT_ORDER), b))
        fp = [r["fp_top1"] for m in methods.values() for rs in m.values() for r in rs]
        iters = sorted({r["iters"] for m in methods.values() for rs in m.values() for r in rs})
        evals = sorted({r.get("eval_images", "?") for m in methods.values() for rs in m.values() for r in rs})
        out.append(f"**{model}** (FP {statistics.mean(fp):.2f} %; quantized top-1 % on {'/'.join(map(str, evals))} "
                   f"test images, mean ± std over n seeds; iterations per unit: {', '.join(map(str, iters))})\n")
        out.append("| method | " + " | ".join(bits) + " | n | wall s/run |")
        out.append("|---" * (len(bits) + 3) + "|")
        for method, by_bits in sorted(methods.items()):
            runs = [r for rs in by_bits.values() for r in rs]
            ns = sorted({len(rs) for rs in by_bits.values()})
            row = [summarize([r["quant_top1"] for r in by_bits[b]]) + (f" (n={len(by_bits[b])})" if len(ns) > 1 else "")
                   if b in by_bits else "–" for b in bits]
            wall = statistics.mean(r["wall_s"] for r in runs)
            out.append(f"| {method} | " + " | ".join(row) + f" | {'/'.join(map(str, ns))} | {wall:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun dirs")
    args = ap.parse_args(argv)
    results, missing = collect(args.dirs)
    print(tables(results))
    if missing:
        print("Missing or failed runs (no results.json):")
        for job in missing:
            print(f"- {job}")


if __name__ == "__main__":
    main()
