"""The integer checkpoint (`quantized_int.safetensors`) and `pdq.load`.

The file holds, in safetensors (no pickle, loadable by any safetensors reader):
* `<layer>.weight.codes`: the weight's integer codes, packed at their real width (`pdq.export.pack`; signed codes
  in two's complement);
* `<layer>.weight_quant.scale` (float32, one per output channel) and `<layer>.weight_quant.zero_point` (uint8);
* `<act quantizer>.scale` (float32) and `<act quantizer>.zero_point` (uint8), per tensor;
* every other tensor of the quantized graph as it is (biases, BatchNorms that follow no conv, ...);
* metadata `pdq`: a JSON object with the format and its version, the model's identity (how to rebuild the
  float architecture), the backend (`pdq.quant.backends`: where the quantizers sit and their grids; a
  version-1 file, written before the backends, has none and is `academic`), the input shape, the bit layout
  (bits and shape of each weight, bits of each activation quantizer), the packing, and the versions that
  wrote it.
A layer or activation quantizer at 32 bits (full precision) keeps its float weight and has no codes.

Grid (spec §1.1, `pdq.quant.functional`): code = clamp(round(w / s) + z, q_min, q_max), value = s * (code - z)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import fx, nn

import pdq
from pdq.errors import PdqError, cause
from pdq.export.pack import pack, unpack
from pdq.io import atomic_write
from pdq.quant import apply_layout, quantize_model
from pdq.quant.functional import broadcast_to_channel, from_codes, to_codes
from pdq.quant.graph import act_quant_names, backend_of, quant_layer_names
from pdq.quant.quantizers import FP_BITS

log = logging.getLogger("pdq")

INT_FILE = "quantized_int.safetensors"
FORMAT, VERSION = "pdq-int", 2
#: versions this pdq reads: 1 (before the backends: every grid the papers' unsigned affine one) and 2 (a backend)
READABLE = (1, 2)
PACKING = "little-endian bitstream of b-bit unsigned codes in row-major order (pdq.export.pack)"
#: the model builders a checkpoint's identity may name (nothing else is imported on load)
BUILDERS = ("build_model", "build_custom")


def model_identity(model_cfg: dict, model: nn.Module) -> dict:
    """How `pdq.load` rebuilds the float architecture (without its weights) from a run's model config:
    a model pdq knows by name, or `model.target` with its kwargs; otherwise (a model given as a Python object,
    a pickled module) only its class, and `pdq.load` needs `model=`."""
    target = str(model_cfg.get("_target_", "")).rpartition(".")[2]
    if target == "build_model":
        return {"builder": target, "name": model_cfg["name"], "num_classes": model_cfg.get("num_classes"),
                "in_channels": model_cfg.get("in_channels")}
    if target == "build_custom" and model_cfg.get("target"):
        return {"builder": target, "name": model_cfg.get("name"), "target": model_cfg["target"],
                "kwargs": model_cfg.get("kwargs")}
    return {"builder": None, "name": model_cfg.get("name"), "class": f"{type(model).__module__}."
                                                                     f"{type(model).__qualname__}"}


def weight_codes(layer: nn.Module) -> torch.Tensor:
    """The integer codes of a quantized layer's weight on its quantizer's grid (int64)."""
    wq = layer.weight_quant
    w = layer.weight.detach().float()
    return to_codes(w, broadcast_to_channel(wq.scale, w, 0), broadcast_to_channel(wq.zero_point, w, 0),
                    wq.grid).long()


def unsigned_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes as their `bits`-bit two's complement (unsigned codes unchanged): what `pack` stores."""
    return codes.long() % (2 ** bits)


def signed_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed codes of `bits`-bit two's complement values."""
    codes = codes.long()
    return torch.where(codes >= 2 ** (bits - 1), codes - 2 ** bits, codes)


def int_tensors(qmodel: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(the tensors of the integer checkpoint, {layer: {bits, shape}}, {activation quantizer: bits})."""
    state = qmodel.state_dict()
    tensors, weights, acts, covered = {}, {}, {}, set()
    for name in quant_layer_names(qmodel):
        layer = qmodel.get_submodule(name)
        wq = layer.weight_quant
        weights[name] = {"bits": wq.bits, "shape": list(layer.weight.shape)}
        covered |= {f"{name}.weight_quant.{key}" for key in ("scale", "zero_point", "initialized")}
        if wq.bits < FP_BITS:
            if not bool(wq.initialized):
                raise PdqError(f"{name}'s weight quantizer was never calibrated; only a finished run is saved")
            tensors[f"{name}.weight.codes"] = pack(unsigned_codes(weight_codes(layer), wq.bits), wq.bits)
            tensors[f"{name}.weight_quant.scale"] = wq.scale.detach().float()
            tensors[f"{name}.weight_quant.zero_point"] = wq.zero_point.detach().to(torch.uint8)
            covered.add(f"{name}.weight")
    for name in act_quant_names(qmodel):
        aq = qmodel.get_submodule(name)
        acts[name] = aq.bits
        covered |= {f"{name}.{key}" for key in ("scale", "zero_point", "initialized")}
        if aq.bits < FP_BITS:
            tensors[f"{name}.scale"] = aq.scale.detach().float()
            tensors[f"{name}.zero_point"] = aq.zero_point.detach().to(torch.uint8)
    for key, value in state.items():
        if key not in covered:
            tensors[key] = value.detach()
    return {k: v.cpu().contiguous().clone() for k, v in tensors.items()}, weights, acts


def save_int(qmodel: fx.GraphModule, path: str | Path, *, identity: dict, input_shape: list[int],
             info: dict | None = None) -> Path:
    """Write the integer checkpoint of a finished quantized graph (atomically)."""
    from safetensors.torch import save

    tensors, weights, acts = int_tensors(qmodel)
    meta = {"format": FORMAT, "version": VERSION, "model": identity, "backend": backend_of(qmodel),
            "input_shape": list(input_shape),
            "weights": weights, "acts": acts, "packing": PACKING,
            "versions": {"pdq": pdq.__version__, "torch": torch.__version__}, **(info or {})}
    return atomic_write(path, save(tensors, metadata={"pdq": json.dumps(meta)}))


def read_int(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an integer checkpoint; a file that is not one is a PdqError naming it."""
    from safetensors import safe_open

    accepted = f"accepted: a {INT_FILE} written by pdq"
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("pdq")
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise PdqError(f"{path} is not a readable safetensors file ({cause(e)}); {accepted}") from None
    try:
        meta = json.loads(raw)
        ok = meta.get("format") == FORMAT
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise PdqError(f"{path} has no pdq metadata (format {FORMAT}); {accepted}")
    if meta.get("version") not in READABLE:
        raise PdqError(f"{path} is {FORMAT} version {meta.get('version')}; accepted: versions "
                       f"{', '.join(map(str, READABLE))} (this pdq "
                       f"{pdq.__version__})")
    return tensors, meta


def int_file(path: str | Path) -> Path:
    """The integer checkpoint of a finished run dir, or the file itself."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise PdqError(f"{path} does not exist; accepted: a finished run dir, or its {INT_FILE}")
    if (path / INT_FILE).is_file():
        return path / INT_FILE
    if not (path / "results.json").is_file():
        raise PdqError(f"{path} holds no finished run (no results.json, no {INT_FILE}); accepted: the run dir of a "
                       f"finished run (an interrupted one continues with `pdq resume={path}`)")
    raise PdqError(f"{path} holds a finished run without {INT_FILE} (written by a pdq before the integer "
                   f"checkpoint); accepted: a run dir of this pdq ({pdq.__version__}); run it again")


def build_float(identity: dict) -> nn.Module:
    """The float architecture a checkpoint's identity names, freshly initialised (its weights come from the
    checkpoint)."""
    from pdq.models import registry

    builder = identity.get("builder")
    if builder == "build_model":
        return registry.build_model(identity["name"], pretrained=False, num_classes=identity.get("num_classes"),
                                    in_channels=identity.get("in_channels"))
    if builder == "build_custom":
        return registry.build_custom(target=identity["target"], kwargs=identity.get("kwargs"))
    raise PdqError(f"this checkpoint's model ({identity.get('class', identity.get('name'))}) was given to pdq as a "
                   f"Python object, so pdq cannot rebuild it; accepted: pdq.load(path, model=<an instance of the "
                   f"float architecture, any weights>)")


def _restored_state(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], meta: dict,
                    source: Path) -> dict[str, torch.Tensor]:
    """`gm`'s state dict with every tensor taken from the checkpoint (codes dequantized)."""
    state = gm.state_dict()
    tensors = dict(tensors)
    for name, spec in meta["weights"].items():
        if spec["bits"] >= FP_BITS:
            continue
        codes = unpack(tensors.pop(f"{name}.weight.codes"), spec["bits"], spec["shape"])
        if gm.get_submodule(name).weight_quant.signed:
            codes = signed_codes(codes, spec["bits"])
        codes = codes.float()
        scale = tensors.pop(f"{name}.weight_quant.scale").float()
        zero_point = tensors.pop(f"{name}.weight_quant.zero_point").float()
        state[f"{name}.weight"] = from_codes(codes, broadcast_to_channel(scale, codes, 0),
                                             broadcast_to_channel(zero_point, codes, 0))
        state[f"{name}.weight_quant.scale"], state[f"{name}.weight_quant.zero_point"] = scale, zero_point
        state[f"{name}.weight_quant.initialized"] = torch.tensor(True)
    for name, bits in meta["acts"].items():
        if bits < FP_BITS:
            state[f"{name}.scale"] = tensors.pop(f"{name}.scale").float()
            state[f"{name}.zero_point"] = tensors.pop(f"{name}.zero_point").float()
            state[f"{name}.initialized"] = torch.tensor(True)
    quantizer_keys = {f"{name}.weight_quant.{k}" for name in meta["weights"] for k in ("scale", "zero_point",
                                                                                        "initialized")}
    quantizer_keys |= {f"{name}.{k}" for name in meta["acts"] for k in ("scale", "zero_point", "initialized")}
    restored = {f"{name}.weight" for name, spec in meta["weights"].items() if spec["bits"] < FP_BITS}
    missing = [k for k in state if k not in tensors and k not in quantizer_keys and k not in restored]
    extra = [k for k in tensors if k not in state]
    if missing or extra:
        raise PdqError(f"{source} does not match the model it names: missing {missing[:5]}, unexpected "
                       f"{extra[:5]}; accepted: the checkpoint of this architecture")
    for key, value in tensors.items():
        if value.shape != state[key].shape:
            raise PdqError(f"{source}: {key} has shape {list(value.shape)}, the model's is "
                           f"{list(state[key].shape)}; accepted: the checkpoint of this architecture")
        state[key] = value.to(state[key].dtype)
    return state


def load_with_meta(path: str | Path, device: str | torch.device = "cpu",
                   model: nn.Module | None = None) -> tuple[fx.GraphModule, dict]:
    """`load`, and the checkpoint's metadata."""
    source = int_file(path)
    tensors, meta = read_int(source)
    gm = quantize_model(model if model is not None else build_float(meta["model"]),
                        backend=meta.get("backend", "academic"))
    layers, acts = quant_layer_names(gm), act_quant_names(gm)
    if set(layers) != set(meta["weights"]) or set(acts) != set(meta["acts"]):
        diff = sorted(set(layers) ^ set(meta["weights"])) + sorted(set(acts) ^ set(meta["acts"]))
        raise PdqError(f"{source} does not match the model's quantized layers (they differ in {diff[:5]}); "
                       f"accepted: the checkpoint of this architecture")
    for name, spec in meta["weights"].items():
        shape = list(gm.get_submodule(name).weight.shape)
        if shape != spec["shape"] or math.prod(shape) == 0:
            raise PdqError(f"{source}: {name}'s weight is {spec['shape']}, the model's is {shape}; accepted: the "
                           f"checkpoint of this architecture")
    try:
        apply_layout(gm, {"weights": {n: s["bits"] for n, s in meta["weights"].items()}, "acts": meta["acts"]})
        gm.load_state_dict(_restored_state(gm, tensors, meta, source))
    except (KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, PdqError):
            raise
        raise PdqError(f"{source} is inconsistent ({cause(e)}); accepted: a {INT_FILE} written by pdq") from None
    return gm.to(device).eval(), meta


def load(path: str | Path, device: str | torch.device = "cpu", *, model: nn.Module | None = None) -> nn.Module:
    """The quantized model of a finished run (its dir, or its `quantized_int.safetensors`) as an `nn.Module` in
    eval mode on `device`: the same fake-quantized graph (and logits) as the run's own evaluation. The float
    architecture is rebuilt from the checkpoint's identity; a model that was given to pdq as a Python object
    is passed again as `model=` (its weights are not used)."""
    return load_with_meta(path, device, model)[0]


def write_int_checkpoint(model_cfg: dict, model: nn.Module, qmodel: fx.GraphModule, input_shape: list[int],
                         out_dir: Path, info: dict) -> dict:
    """Write a run's integer checkpoint (`info`: what the run was, kept in its metadata); returns its size next to
    the float model's (bytes)."""
    path = save_int(qmodel, out_dir / INT_FILE, identity=model_identity(model_cfg, model), input_shape=input_shape,
                    info=info)
    sizes = {"fp32_state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
             "int_file_bytes": path.stat().st_size}
    log.info("wrote %s: %.1f KiB (float state dict: %.1f KiB)", path, sizes["int_file_bytes"] / 1024,
             sizes["fp32_state_bytes"] / 1024)
    return sizes
