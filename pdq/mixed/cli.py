"""`pdq sensitivity [overrides ...] [--out DIR]`: the per-layer sensitivity table on its own (and, with a
`quant.budget.*`, the allocation), from the same config as `pdq quant=mixed`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pdq.errors import PdqError

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def sensitivity_run(overrides: list[str], out: Path | None) -> Path:
    """Measure (and allocate, with a budget) for the composed config; returns the dir the files went to."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from pdq.config import resolvers
    from pdq.context import resolve_device
    from pdq.errors import instantiate
    from pdq.io import write_files
    from pdq.mixed.layout import sensitivity_files
    from pdq.mixed.sensitivity import layer_costs
    from pdq.quant import apply_layout, quantize_model
    from pdq.validate import validate

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["quant=mixed", "paths.output_dir=.", *overrides])
    except HydraException as e:
        raise PdqError(f"pdq sensitivity {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    with resolvers():
        layout = validate(cfg)
        out = out or Path("outputs") / "sensitivity" / f"{cfg.model.name}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
        device = resolve_device(cfg)
        model = instantiate(cfg.model).eval().to(device)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup()
        gm = quantize_model(model, backend=layout.backend).to(device)
        apply_layout(gm, layout.resolve(gm))
        images = datamodule.calibration_set(cfg.calib.size, cfg.seed).to(device)
        settings = {"model": cfg.model.name, "calib_size": cfg.calib.size, "seed": cfg.seed}
        cache_dir = cfg.paths.cache_dir
        if layout.budget_key is not None:
            files = layout.allocate(gm, images, cache_dir, settings)[1]
        else:
            files = sensitivity_files(layout.sensitivity(gm, images, cache_dir),
                                      layer_costs(gm, images[:1], layout.resolve(gm)["acts"]), layout.fixed(gm),
                                      {"temperature": layout.temperature, **settings})
        write_files(out, files)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdq sensitivity", description="Per-layer PD sensitivity (and allocation).")
    ap.add_argument("overrides", nargs="*", help="config overrides as for pdq: model=..., calib.size=..., "
                                                 "quant.candidates=[2,4,8], quant.budget.avg_w_bits=3")
    ap.add_argument("--out", type=Path, help="output dir (default: outputs/sensitivity/<model>_s<seed>_<time>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.time()
    try:
        out = sensitivity_run(args.overrides, args.out)
    except PdqError as e:
        print(f"pdq sensitivity: error: {e}", file=sys.stderr)
        return 2
    print(f"{out} ({time.time() - t0:.1f} s)")
    return 0
