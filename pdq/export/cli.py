"""`pdq export RUN_DIR --format onnx [--opset N] [--out PATH]`: a finished run's model as an ONNX QDQ file."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pdq.errors import PdqError
from pdq.export.onnx import MAX_OPSET, MIN_OPSET, ONNX_FILE, export_onnx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdq export", description="Export a finished pdq run's quantized model.")
    ap.add_argument("run_dir", help="a finished run dir, or its quantized_int.safetensors")
    ap.add_argument("--format", choices=["onnx"], required=True, help="onnx: QuantizeLinear/DequantizeLinear graph")
    ap.add_argument("--opset", type=int, default=None,
                    help=f"{MIN_OPSET}..{MAX_OPSET} (default: the lowest with every width's own integer type)")
    ap.add_argument("--out", help=f"output file (default: RUN_DIR/{ONNX_FILE})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.time()
    try:
        path = export_onnx(args.run_dir, args.out, args.opset)
    except PdqError as e:
        print(f"pdq export: error: {e}", file=sys.stderr)
        return 2
    print(f"{path} ({time.time() - t0:.1f} s)")
    return 0
