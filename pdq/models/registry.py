"""Model registry: the embedded reference models, torchvision's classification models, and the paper zoo
(`pdq.models.paper` registers its models here with `register_model`).

`build_model` is the `_target_` of every `conf/model/*.yaml`."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from omegaconf import ListConfig, OmegaConf
from torch import nn

from pdq.errors import PdqError, cause
from pdq.models import fmnist

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

#: models defined in pdq whose trained checkpoints ship with the package
EMBEDDED: dict[str, Callable[..., nn.Module]] = {
    "resnet20_fmnist": fmnist.resnet20_fmnist,
    "mobilenetv2_fmnist": fmnist.mobilenetv2_fmnist,
}
#: further pdq-defined architectures (the paper zoo registers here); loaded from `checkpoint=`
REGISTRY: dict[str, Callable[..., nn.Module]] = {}
#: the file name of a registered model's released checkpoint, looked up in `checkpoint_dir=`
RELEASE_FILES: dict[str, str] = {}


def register_model(name: str, release_file: str | None = None):
    def deco(fn):
        REGISTRY[name] = fn
        if release_file:
            RELEASE_FILES[name] = release_file
        return fn
    return deco


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_models() -> list[str]:
    return sorted(EMBEDDED) + sorted(REGISTRY) + torchvision_names()


def check_model_name(name: str) -> None:
    if name not in EMBEDDED and name not in REGISTRY and name not in torchvision_names():
        raise PdqError(f"unknown model {name!r}; accepted: {', '.join(sorted(EMBEDDED) + sorted(REGISTRY))}, "
                       f"or a torchvision classification model ({', '.join(torchvision_names()[:6])}, ...)")


def check_model_config(model_cfg) -> None:
    """Cheap checks of the model config before anything is loaded: a known name, or an importable target."""
    if str(model_cfg.get("_target_", "")).endswith("build_custom"):
        kwargs = model_cfg.get("kwargs")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            shown = OmegaConf.to_container(kwargs) if isinstance(kwargs, ListConfig) else kwargs
            raise PdqError(f"model.kwargs={shown!r} is not accepted; accepted: a mapping of keyword arguments, "
                           f"e.g. model.kwargs={{num_classes:10}}")
        if model_cfg.get("target"):
            _import_target(model_cfg.target)
        elif not model_cfg.get("checkpoint"):
            raise PdqError("model=custom needs model.target=<dotted path of a class or factory>, e.g. "
                           "my_pkg.my_module.MyNet (or model.checkpoint=PATH of a whole module with "
                           "model.trust_checkpoint=true)")
    else:
        check_model_name(model_cfg.name)


def expected_input(model: nn.Module) -> str:
    """What the model's first conv takes, in words."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return f"its first conv {name} takes {mod.in_channels} input channels"
    return "it has no Conv2d"


def check_forward(model: nn.Module) -> None:
    """The model takes one image batch, in float32, as its forward's signature and its parameters say: checked
    as soon as the model is built, before it is traced or any data is loaded (a model with two inputs, or in
    float16, would otherwise fail `check_input` as a channel mismatch)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        params = []
    inputs = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs) > 1:
        raise PdqError(f"the model's forward takes {len(inputs)} inputs ({', '.join(inputs)}); accepted: a model whose "
                       f"forward takes one image batch")
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()} - {torch.float32}
    if dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise PdqError(f"the model's parameters are {names}; accepted: a float32 model (call model.float())")


@torch.no_grad()
def check_input(model: nn.Module, image: torch.Tensor, datamodule) -> None:
    """One calibration image through the float model before any heavy work: a shape or channel mismatch
    is one error naming both sides; the model must return [N, classes] logits, at least as many as the data
    module's evaluation classes (its `num_classes`, where it has one; `classes_from` says where they come from)."""
    data = datamodule.name
    try:
        out = model(image[None])
    except Exception as e:
        raise PdqError(f"the model does not take data={data}'s images: they are {list(image.shape)} (C x H x W), "
                       f"and {expected_input(model)} ({cause(e)}); accepted: a model and data that match "
                       f"(model.in_channels, data.channels, data.image_size)") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PdqError(f"{type(model).__name__} returns {got} for one image; accepted: a model that returns logits "
                       f"of shape [N, classes]")
    classes, outputs = getattr(datamodule, "num_classes", None), out.shape[1]
    if classes is not None and classes > outputs:
        where = getattr(datamodule, "classes_from", "its labels")
        raise PdqError(f"data={data} has {classes} evaluation classes ({where}) but the model has {outputs} outputs: "
                       f"the images of the last {classes - outputs} classes could never be predicted and top-1 would "
                       f"be wrong; accepted: at most {outputs} classes, in the order of the model's outputs (fewer "
                       f"are fine)")


def _expected_sha256(path: Path) -> str | None:
    sums = path.parent / "SHA256SUMS"
    if not sums.exists():
        return None
    for line in sums.read_text().splitlines():
        digest, _, fname = line.partition("  ")
        if fname == path.name:
            return digest
    return None


def _read_checkpoint(path: Path, trust: bool):
    """The object in a checkpoint file; a pickled object beyond tensors and containers only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust and "Unsupported global" in str(e):
            raise PdqError(f"model.checkpoint={str(path)!r} holds pickled Python objects (e.g. a whole module saved "
                           f"with torch.save(model)), and unpickling them can run arbitrary code; accepted: a state "
                           f"dict (torch.save(model.state_dict())), or model.trust_checkpoint=true for a file you "
                           f"trust") from None
        detail = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or cause(e)
        raise PdqError(f"model.checkpoint={str(path)!r} is corrupt or not a PyTorch checkpoint: {detail}") from None
    except Exception as e:  # truncated zip, garbage, a class that no longer imports
        raise PdqError(f"model.checkpoint={str(path)!r} is corrupt or not a PyTorch checkpoint: {cause(e)}") from None


def load_checkpoint(path: str | Path, verify_sha256: bool = False, trust: bool = False) -> dict | nn.Module:
    """A checkpoint file's state dict (raw, or under `state_dict` / `model` as BRECQ's MobileNetV2, a DDP
    `module.` prefix stripped), or with `trust` the whole module it may hold."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PdqError(f"model.checkpoint={str(path)!r} does not exist (accepted: a readable .pt/.pth/.pth.tar file)")
    if verify_sha256:
        want = _expected_sha256(path)
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if want is not None and want != got:
            raise PdqError(f"checkpoint {path} is corrupt: SHA-256 {got} does not match the recorded {want}")
    if path.stat().st_size == 0:
        raise PdqError(f"model.checkpoint={str(path)!r} is an empty file (0 bytes); accepted: a PyTorch checkpoint "
                       f"(a state dict saved by torch.save)")
    obj = _read_checkpoint(path, trust)
    if isinstance(obj, nn.Module):
        return obj
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), (dict, nn.Module)):
            obj = obj[key]
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PdqError(f"model.checkpoint={str(path)!r} holds no state dict (a dict of tensors, "
                       f"optionally under 'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(path: str | Path, verify_sha256: bool = False, trust: bool = False) -> dict[str, torch.Tensor]:
    obj = load_checkpoint(path, verify_sha256, trust)
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or inf: the model would run, and quantize, to chance-level accuracy."""
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise PdqError(f"{source} holds non-finite weights: tensor {name!r} has {bad} NaN/inf values "
                               f"(of {t.numel()}); accepted: finite weights")


def mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 5) -> str:
    """The first missing and unexpected keys and mismatched shapes of `state` against `model` ('' if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})" for k in own
              if k in state and state[k].shape != own[k].shape]
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched shapes", shapes)):
        if items:
            more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:shown])}{more}")
    return "; ".join(parts)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    check_finite(state, source)
    try:
        model.load_state_dict(state, strict=True)  # a model may adapt itself first (BRECQ's deep stem)
    except RuntimeError as e:
        problems = mismatch(model, state) or str(e).splitlines()[0][:300]
        raise PdqError(f"{source} does not fit {type(model).__name__}: {problems}") from None
    return model


def _import_target(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        raise PdqError(f"model.target={target!r} is not a dotted path; accepted: an importable class or factory, "
                       f"e.g. my_pkg.my_module.MyNet")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PdqError(f"model.target={target!r}: module {module_name!r} cannot be imported ({cause(e)}); accepted: "
                       f"a module on the current directory or PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PdqError(f"model.target={target!r}: {module_name} has no class or function {attr!r}; accepted: "
                       f"{', '.join(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith('_'))}")
    return fn


def build_custom(target: str | None = None, kwargs: dict | None = None, checkpoint: str | None = None,
                 trust_checkpoint: bool = False, name: str = "custom", ptq: dict | None = None) -> nn.Module:
    """The user's own model (`model=custom`): `target(**kwargs)` with `checkpoint` loaded into it, or the whole
    module a trusted checkpoint holds. `name` labels the run; `ptq` is read by the method configs."""
    if target is None and checkpoint is None:
        raise PdqError("model=custom needs model.target=<dotted path of a class or factory> (and usually "
                       "model.checkpoint=PATH), or model.checkpoint=PATH of a whole module with "
                       "model.trust_checkpoint=true")
    saved = load_checkpoint(checkpoint, trust=trust_checkpoint) if checkpoint is not None else None
    if target is None:
        if not isinstance(saved, nn.Module):
            raise PdqError(f"model.checkpoint={checkpoint!r} holds a state dict, not a module; accepted: "
                           f"model.target=<the class or factory it belongs to>")
        return saved.float().eval()
    fn = _import_target(target)
    try:
        model = fn(**(kwargs or {}))
    except Exception as e:
        raise PdqError(f"model.target={target!r} with model.kwargs={dict(kwargs or {})} failed: {cause(e)}") from None
    if not isinstance(model, nn.Module):
        raise PdqError(f"model.target={target!r} returned {type(model).__name__}; accepted: a class or factory "
                       f"that returns a torch.nn.Module")
    if saved is not None:
        state = saved.state_dict() if isinstance(saved, nn.Module) else saved
        _load_into(model, state, f"model.checkpoint={checkpoint!r}")
    return model.eval()


def adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first Conv2d by one that takes `in_channels` input channels (freshly initialised)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels != in_channels:
                if mod.groups != 1:
                    raise PdqError(f"model.in_channels={in_channels}: the stem {name} is a grouped conv; "
                                   f"accepted: models whose first conv is dense")
                new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                mod.dilation, 1, mod.bias is not None, mod.padding_mode)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, new)
            return model
    raise PdqError(f"model.in_channels={in_channels}: {type(model).__name__} has no Conv2d stem to adapt")


def release_checkpoint(name: str, checkpoint_dir: str | Path) -> Path:
    """`checkpoint_dir/<the release file of model name>` (e.g. BRECQ's `resnet18_imagenet.pth.tar`)."""
    if name not in RELEASE_FILES:
        raise PdqError(f"model.checkpoint_dir applies to models with a known release file "
                       f"({', '.join(f'{m}: {f}' for m, f in sorted(RELEASE_FILES.items()))}); "
                       f"{name} loads model.checkpoint=PATH")
    path = Path(checkpoint_dir).expanduser() / RELEASE_FILES[name]
    if not path.is_file():
        raise PdqError(f"model.checkpoint_dir={str(checkpoint_dir)!r} has no {RELEASE_FILES[name]} for {name} "
                       f"(expected {path}); or set model.checkpoint=PATH")
    return path


def build_model(name: str, checkpoint: str | None = None, weights: str | None = None,
                pretrained: bool = True, num_classes: int | None = None, in_channels: int | None = None,
                trust_checkpoint: bool = False, ptq: dict | None = None,
                checkpoint_dir: str | None = None) -> nn.Module:
    """Build model `name` in eval mode. Embedded models load their bundled checkpoint unless
    `checkpoint=` is given; torchvision models need `weights=` (enum name) or `checkpoint=`, and take
    `num_classes` / `in_channels` (head and stem adapted before the checkpoint is loaded); the paper
    models load `checkpoint=` or their release file from `checkpoint_dir=` (`checkpoint` wins).
    `ptq` holds the model's PTQ settings for the method configs; it does not change the model."""
    check_model_name(name)
    if checkpoint_dir is not None and checkpoint is None:
        checkpoint = str(release_checkpoint(name, checkpoint_dir))
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PdqError(f"model.{key}={value!r} is not accepted; accepted: a positive integer, or null")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    source = f"model.checkpoint={checkpoint!r}"
    if name in EMBEDDED or name in REGISTRY:
        if weights or in_channels:
            key, value = ("weights", weights) if weights else ("in_channels", in_channels)
            raise PdqError(f"model.{key}={value!r} applies to torchvision models only; {name} loads "
                           f"model.checkpoint=PATH")
        model = (EMBEDDED.get(name) or REGISTRY[name])(**kwargs)
        if checkpoint is None and name in EMBEDDED and pretrained:
            path = CHECKPOINT_DIR / f"{name}.pt"
            _load_into(model, load_state_dict(path, verify_sha256=True), f"bundled checkpoint {path}")
        elif checkpoint is not None:
            _load_into(model, load_state_dict(checkpoint, trust=trust_checkpoint), source)
        elif pretrained:
            raise PdqError(f"model={name} needs trained weights (none are bundled): set model.checkpoint=PATH")
        return model.eval()
    if weights and checkpoint:
        raise PdqError("set either model.weights or model.checkpoint, not both")
    if weights:
        if kwargs or in_channels:
            raise PdqError(f"model.weights={weights!r} holds the standard head and stem; model.num_classes / "
                           f"model.in_channels need model.checkpoint=PATH of the adapted model instead")
        try:
            enum = torchvision.models.get_model_weights(name)
            w = enum[weights.split(".")[-1]]
        except KeyError:
            raise PdqError(f"model.weights={weights!r} is not a weights enum of {name}; accepted: "
                           f"{', '.join(enum.__members__)}") from None
        try:
            model = torchvision.models.get_model(name, weights=w).eval()
        except Exception as e:
            raise PdqError(f"could not fetch torchvision weights {weights} for {name} ({type(e).__name__}); "
                           f"offline machines use model.checkpoint=PATH") from None
        check_finite(model.state_dict(), f"model.weights={weights!r}")
        return model
    if checkpoint is None and pretrained:
        raise PdqError(f"model={name} needs trained weights: model.weights=<enum, e.g. IMAGENET1K_V1> "
                       f"or model.checkpoint=PATH")
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if in_channels:
        adapt_stem(model, in_channels)
    if checkpoint is not None:
        _load_into(model, load_state_dict(checkpoint, trust=trust_checkpoint), source)
    return model.eval()
