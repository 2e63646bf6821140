"""Model registry: the embedded reference models, torchvision's classification models, and the paper zoo
(`pdq.models.paper` registers its models here with `register_model`).

`build_model` is the `_target_` of every `conf/model/*.yaml`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
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


def _expected_sha256(path: Path) -> str | None:
    sums = path.parent / "SHA256SUMS"
    if not sums.exists():
        return None
    for line in sums.read_text().splitlines():
        digest, _, fname = line.partition("  ")
        if fname == path.name:
            return digest
    return None


def load_state_dict(path: str | Path, verify_sha256: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint file into a state dict; accepts a raw state dict or one under
    `state_dict` / `model` (BRECQ's MobileNetV2), and strips a DDP `module.` prefix."""
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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise PdqError(f"model.checkpoint={str(path)!r} is corrupt or not a PyTorch checkpoint: {cause(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PdqError(f"model.checkpoint={str(path)!r} holds no state dict (a dict of tensors, "
                       f"optionally under 'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or inf: the model would run, and quantize, to chance-level accuracy."""
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise PdqError(f"{source} holds non-finite weights: tensor {name!r} has {bad} NaN/inf values "
                               f"(of {t.numel()}); accepted: finite weights")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    check_finite(state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PdqError(f"{source} does not fit {type(model).__name__}: {str(e).splitlines()[0][:300]}") from None
    return model


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
                pretrained: bool = True, num_classes: int | None = None, ptq: dict | None = None,
                checkpoint_dir: str | None = None) -> nn.Module:
    """Build model `name` in eval mode. Embedded models load their bundled checkpoint unless
    `checkpoint=` is given; torchvision models need `weights=` (enum name) or `checkpoint=`; the paper
    models load `checkpoint=` or their release file from `checkpoint_dir=` (`checkpoint` wins).
    `ptq` holds the model's PTQ settings for the method configs; it does not change the model."""
    check_model_name(name)
    if checkpoint_dir is not None and checkpoint is None:
        checkpoint = str(release_checkpoint(name, checkpoint_dir))
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if name in EMBEDDED or name in REGISTRY:
        if weights:
            raise PdqError(f"model.weights={weights!r} applies to torchvision models only; "
                           f"{name} loads model.checkpoint=PATH")
        model = (EMBEDDED.get(name) or REGISTRY[name])(**kwargs)
        if checkpoint is None and name in EMBEDDED and pretrained:
            path = CHECKPOINT_DIR / f"{name}.pt"
            _load_into(model, load_state_dict(path, verify_sha256=True), f"bundled checkpoint {path}")
        elif checkpoint is not None:
            _load_into(model, load_state_dict(checkpoint), f"model.checkpoint={checkpoint!r}")
        elif pretrained:
            raise PdqError(f"model={name} needs trained weights (none are bundled): set model.checkpoint=PATH")
        return model.eval()
    if weights and checkpoint:
        raise PdqError("set either model.weights or model.checkpoint, not both")
    if weights:
        try:
            enum = torchvision.models.get_model_weights(name)
            w = enum[weights.split(".")[-1]]
        except KeyError:
            raise PdqError(f"model.weights={weights!r} is not a weights enum of {name}; accepted: "
                           f"{', '.join(enum.__members__)}") from None
        try:
            model = torchvision.models.get_model(name, weights=w, **kwargs).eval()
        except Exception as e:
            raise PdqError(f"could not fetch torchvision weights {weights} for {name} ({type(e).__name__}); "
                           f"offline machines use model.checkpoint=PATH") from None
        check_finite(model.state_dict(), f"model.weights={weights!r}")
        return model
    if checkpoint is None and pretrained:
        raise PdqError(f"model={name} needs trained weights: model.weights=<enum, e.g. IMAGENET1K_V1> "
                       f"or model.checkpoint=PATH")
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if checkpoint is not None:
        _load_into(model, load_state_dict(checkpoint), f"model.checkpoint={checkpoint!r}")
    return model.eval()
