"""Finding job dirs and reading their `results.json`; the job dirs without a usable one."""

from __future__ import annotations

import json
import time
from pathlib import Path

#: the fields the tables need, with their types; a results.json without them is unreadable
REQUIRED = {"model": str, "method": str, "w_bits": int, "a_bits": int, "seed": (int, str), "quant_top1": (int, float)}
#: fields read where present; another type makes the file unreadable too
OPTIONAL = {"fp_top1": (int, float, type(None)), "wall_s": (int, float, type(None)), "config": (dict, type(None)),
            "components": dict}


def old_components(r: dict) -> dict[str, bool]:
    """For results.json files written before runs stored `components`: PD term, reconstruction regulariser
    and Distribution Correction from the method config (all false where the keys are absent)."""
    m = (r.get("config") or {}).get("method") or {}
    return {"pd": (m.get("pd_weight") or 0) > 0, "reg": (m.get("rec_weight") or 0) > 0,
            "dc": bool((m.get("dc") or {}).get("enabled"))}


def read_results(job: Path) -> dict | None:
    """The job's results.json (with `_dir` and `components` added), or None when it is missing, not JSON,
    or lacks a field the report needs."""
    try:
        r = json.loads((job / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict):
        return None
    if any(not isinstance(r.get(k), t) for k, t in REQUIRED.items()):
        return None
    if any(k in r and not isinstance(r[k], t) for k, t in OPTIONAL.items()):
        return None
    return r | {"_dir": str(job), "components": r.get("components") or old_components(r)}


def unevaluated(job: Path) -> bool:
    """A finished run without an evaluation set (data=folder without eval_root): no top-1 to tabulate."""
    try:
        r = json.loads((job / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(r, dict) and "quant_top1" in r and r["quant_top1"] is None


def collect(dirs: list[str | Path]) -> tuple[list[dict], list[Path]]:
    """(results, missing): every readable results.json below `dirs` (see `read_results`), and the job dirs
    (holding `.hydra/` or `results.json`) that have none or an unreadable one. Each job counted once."""
    jobs: set[Path] = set()
    for d in map(Path, dirs):
        jobs |= {p.parent.resolve() for p in d.rglob(".hydra") if p.is_dir()}
        jobs |= {p.parent.resolve() for p in d.rglob("results.json")}
    results, missing = [], []
    for job in sorted(jobs):
        r = read_results(job)
        if r is None:
            missing.append(job)
        else:
            results.append(r)
    return results, missing


def missing_note(job: Path) -> str:
    if (job / "results.json").exists():
        return "finished without an evaluation set: no top-1" if unevaluated(job) else "results.json unreadable"
    files = [p for p in job.rglob("*") if p.is_file()]
    if not files:
        return "no results.json, empty"
    age = time.time() - max(p.stat().st_mtime for p in files)
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return f"no results.json; newest file written {ago} ago"


def missing_lines(missing: list[Path]) -> list[str]:
    return [f"- {job} ({missing_note(job)})" for job in missing]
