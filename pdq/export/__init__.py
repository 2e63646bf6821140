"""Taking a quantized model out of pdq: `load` (a run's model as an nn.Module), the integer checkpoint
(`quantized_int.safetensors`), and ONNX QDQ export (`pdq export`, `export=onnx`)."""

from pdq.export.checkpoint import INT_FILE, load, save_int
from pdq.export.onnx import OnnxExport, export_onnx

__all__ = ["INT_FILE", "OnnxExport", "export_onnx", "load", "save_int"]
