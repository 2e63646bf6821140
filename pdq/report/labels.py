"""Run labels (the table rows) and the orders of methods, models and bit settings.

`label_runs` labels every run once per report; the tables and plots group by that `_label`."""

from __future__ import annotations

import json
from collections import defaultdict

from pdq.checks import flatten
from pdq.config import SAVED_BEFORE, UNUSED, unused_before
from pdq.quant.label import bit_setting

#: method keys that runs written before them lack, with their value then (filled in; `UNUSED`: ignored)
METHOD_BEFORE = {k.removeprefix("method."): v for k, v in SAVED_BEFORE.items() if k.startswith("method.")}

PAPER_BITS = ["W4A4", "W2A4", "W4A2", "W2A2"]
METHOD_ORDER = ["rtn_minmax", "rtn_cosine", "rtn_mse", "pd_scale", "adaround", "brecq",
                "qdrop", "pd_only", "pd_reg", "qdrop_dc", "pdquant", "pdquant_plus"]
#: column order: the paper's Table 3 models, then the reference models, then any other model by name
MODEL_ORDER = ["resnet18_brecq", "resnet50_brecq", "mobilenetv2_brecq", "regnetx_600m", "regnetx_3200m", "mnasnet_x2",
               "resnet20_fmnist", "mobilenetv2_fmnist"]
#: config keys besides the method's that change a result (calib.size is `calib_size`, in `settings`)
QUANT_KEYS = ["layout", "per_layer", "stem_w_bits", "stem_out_bits", "fc_w_bits", "fc_in_bits", "backend"]
CALIB_KEYS = ["batch_size", "act_init_size", "cache_dtype"]


def bits(r: dict) -> str:
    """The bit setting's column of a run (`bit_setting` of its results.json)."""
    return bit_setting(r["w_bits"], r["a_bits"], (r.get("mixed") or {}).get("budget"))


def bits_key(b: str) -> tuple:
    """Column order: the paper's settings, the other uniform ones (wide to narrow), then mixed budgets."""
    if b in PAPER_BITS:
        return (0, PAPER_BITS.index(b))
    if b.startswith("mixed "):
        budget, a = b.removeprefix("mixed ").rsplit(" ", 1)
        key, value = budget.split("=")
        return (2, key, float(value), a)
    w, a = (int(x) if x.isdigit() else 0 for x in b[1:].split("A"))
    return (1, -w, -a, b)


def order_key(order: list[str], name: str) -> tuple:
    """Sort key: the position in `order`, then any name not in it, alphabetically."""
    return (order.index(name), "") if name in order else (len(order), name)


def method_key(method: str) -> tuple:
    return order_key(METHOD_ORDER, method)


def model_key(model: str) -> tuple:
    return order_key(MODEL_ORDER, model)


def settings(r: dict) -> tuple:
    """(iterations, calibration images, evaluation images): shown as `(100 it, 256 calib)` where they differ."""
    return (r.get("iters", "?"), r.get("calib_size", "?"), r.get("eval_images", "?"))


def label_key(runs: list[dict]) -> tuple:
    """Sort key of a row (all runs of one label): paper method order, then settings."""
    r = runs[0]
    return method_key(r["method"]) + tuple(str(s).zfill(12) for s in settings(r))


def run_settings(r: dict) -> dict[str, str]:
    """Every other setting that changes a result, as flat JSON strings: the top-level method keys (`dc.chunk`,
    `round_lr`, ...; not `name` and `iters`), `phases.<i>.<key>` where a phase's value is not the method's,
    `quant.<key>` for QUANT_KEYS, `calib.<key>` for CALIB_KEYS and `world_size` (the process count)."""
    cfg = r.get("config") or {}
    method = {**{k: v for k, v in METHOD_BEFORE.items() if v is not UNUSED}, **(cfg.get("method") or {})}
    quant = {"backend": "academic", **(cfg.get("quant") or {})}  # runs from before the backends were academic
    calib = {"cache_dtype": "float32", **(cfg.get("calib") or {})}  # the default before cache_dtype existed
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        flat.update({k: json.dumps(v, sort_keys=True) for k, v in flatten(value, prefix).items() if v != {}})

    walk("", {k: v for k, v in method.items() if k not in ("phases", "name", "iters")})
    for i, phase in enumerate(method.get("phases") or []):  # what a phase sets itself, not the method's values
        walk(f"phases.{i}", {k: v for k, v in (phase or {}).items() if v != method.get(k)})
    walk("quant", {k: quant[k] for k in QUANT_KEYS if k in quant})
    walk("calib", {k: calib[k] for k in CALIB_KEYS if k in calib})
    walk("world_size", r.get("world_size", 1))  # files written before DDP ran one process
    return flat


def label_runs(results: list[dict]) -> None:
    """Set `_label` on every run: the method name; plus `(iters it, calib calib[, eval eval])` where the
    method ran with several of those; plus, in brackets, every `run_settings` key whose value differs between
    runs of the same method, model and bits (e.g. `pdquant [dc.chunk=32]`, `qdrop [world_size=2]`). Runs
    that differ in anything that changes a result thus never share a label, while ordinary reports keep the
    plain method name. Called once per report."""
    variants: dict[str, set] = defaultdict(set)
    values: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    flat = {id(r): run_settings(r) for r in results}
    for r in results:
        variants[r["method"]].add(settings(r))
        for k, v in flat[id(r)].items():
            values[(r["method"], r["model"], bits(r))][k].add(v)
    for r in results:
        vs = variants[r["method"]]
        label = r["method"]
        if len(vs) > 1:
            iters, calib, evals = settings(r)
            extra = f", {evals} eval" if len({v[2] for v in vs}) > 1 else ""
            label = f"{label} ({iters} it, {calib} calib{extra})"
        mine = flat[id(r)]
        differing = sorted(k for k, vals in values[(r["method"], r["model"], bits(r))].items()
                           if len(vals) > 1 or (k not in mine and not unused_before(f"method.{k}")))
        if differing:
            label += " [" + ", ".join(f"{k}={json.loads(mine[k]) if k in mine else '–'}" for k in differing) + "]"
        r["_label"] = label
