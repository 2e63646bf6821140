"""Content-addressed results under `paths.cache_dir`: one key function, one load/validate/save path, and the
`pdq cache list|prune` command.

A namespace holds one kind of result (`NAMESPACES`: the FP top-1, Distribution Correction's corrected inputs,
quant=mixed's sensitivity table). An entry is `<cache_dir>/<namespace>/<key>.<json|pt>` (the value) and
`<key>.meta` (JSON: the namespace, the key, the key's fields and the creation time). The key is the SHA-256 of
the canonical JSON of the namespace, `FORMAT` and the fields, which always include the torch version and the
device type. Fields are plain values: `describe` turns tensors, modules, dataclasses and config objects
(observers) into explicit fields (class path and attributes, digests of tensors), never into their `repr`.

Writes are atomic (`pdq.io`): the value first, then the metadata, which makes the entry. Reading one that does
not load or does not match (metadata, value, the caller's `check`) is a miss with one warning line; the caller
recomputes and overwrites it. Files of older layouts are never read (their names are not keys), so they miss;
`pdq cache list` shows them and `pdq cache prune` removes them."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from pdq.distributed import state_sha256, tensor_bytes
from pdq.errors import PdqError, cause
from pdq.io import atomic_torch_save, atomic_write_json

log = logging.getLogger("pdq")

#: namespace -> how its values are stored: JSON, or torch.save (tensors, loaded with weights_only)
NAMESPACES = {"fp_top1": "json", "dc": "pt", "sensitivity": "json"}
FORMAT = 1  # part of every key: bump it when an entry's layout changes, so that older entries miss
META = ".meta"
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: objects with attributes that are not their settings (`describe` refuses them)
NOT_CONFIG = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
              functools.partial)


def class_path(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def tensor_sha256(t: torch.Tensor) -> str:
    """Digest of a tensor's bytes (its shape and dtype are separate fields, see `describe`)."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def describe(value: Any) -> Any:
    """`value` as key fields: JSON values (tuples as lists, sets sorted, dict keys as strings); a tensor as its
    shape, dtype and digest; a module as its class path and `state_sha256`; an OmegaConf config as its resolved
    values; a dataclass or a settings object (an observer) as its class path and fields (attributes). Anything
    else is a TypeError: a key is never an object's repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((describe(v) for v in value), key=canonical)
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, DictConfig | ListConfig):
        return describe(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype), "sha256": tensor_sha256(value)}
    if isinstance(value, nn.Module):
        return {"class": class_path(value), "state_sha256": state_sha256(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": class_path(value),
                **{f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if hasattr(value, "__dict__") and not isinstance(value, NOT_CONFIG):
        return {"class": class_path(value), **{k: describe(v) for k, v in vars(value).items()}}
    raise TypeError(f"no cache key fields for a {class_path(value)}; pass its settings as plain values")


def canonical(fields: Any) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass
class Entry:
    """One result's place in the cache: `path` (the value) and its metadata `meta_path`."""

    namespace: str
    key: str
    fields: dict
    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.key + META)

    def __str__(self) -> str:
        return str(self.path)

    def load(self, check: Callable[[Any], Any] | None = None) -> Any:
        """The stored value (through `check`, which may convert it and raises where it does not fit), or None:
        a plain miss where there is no entry, a miss with one warning where it does not load or fit."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            if (meta.get("format"), meta.get("namespace"), meta.get("key")) != (FORMAT, self.namespace, self.key) \
                    or canonical(meta.get("fields")) != canonical(self.fields):
                raise ValueError(f"its metadata is not this key's (format {meta.get('format')!r})")
            if NAMESPACES[self.namespace] == "json":
                value = json.loads(self.path.read_text())
            else:
                value = torch.load(self.path, map_location="cpu", weights_only=True)
            return check(value) if check is not None else value
        except Exception as e:
            log.warning("%s cache entry %s is unreadable (%s); recomputing it", self.namespace, self.path, cause(e))
            return None

    def save(self, value: Any) -> None:
        """Write the value, then the metadata that makes it an entry (each atomically)."""
        if NAMESPACES[self.namespace] == "json":
            atomic_write_json(self.path, value)
        else:
            atomic_torch_save(value, self.path)
        atomic_write_json(self.meta_path, {"format": FORMAT, "namespace": self.namespace, "key": self.key,
                                           "created": time.time(), "fields": self.fields})


def entry(cache_dir: str | Path, namespace: str, fields: dict, device: torch.device | str) -> Entry:
    """The entry of `fields` (`describe`d) in `namespace`; the key also covers the torch version and the type of
    the device the result is computed on."""
    if namespace not in NAMESPACES:
        raise ValueError(f"unknown cache namespace {namespace!r}; known: {', '.join(NAMESPACES)}")
    fields = {**describe(fields), "torch": torch.__version__, "device": torch.device(device).type}
    key = hashlib.sha256(canonical({"namespace": namespace, "format": FORMAT, "fields": fields}).encode()).hexdigest()
    return Entry(namespace, key, fields, Path(cache_dir) / namespace / f"{key}.{NAMESPACES[namespace]}")


# --- list and prune ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stored:
    """What `scan` finds: an entry's files, their bytes, its creation time (the files' time where there is no
    metadata: an older layout or an interrupted write) and its fields (None without metadata)."""

    namespace: str
    key: str
    files: list[Path]
    size: int
    created: float
    fields: dict | None


def scan(cache_dir: str | Path, namespace: str | None = None) -> list[Stored]:
    """The entries under `cache_dir` (of `namespace`, or all), oldest first."""
    found = []
    for ns in [namespace] if namespace else NAMESPACES:
        folder = Path(cache_dir) / ns
        groups: dict[str, list[Path]] = {}
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.is_file() and not f.name.startswith("."):  # a dot file is an atomic write under way
                groups.setdefault(f.name.split(".")[0], []).append(f)
        for key, files in groups.items():
            meta = None
            if (folder / (key + META)).is_file():
                try:
                    meta = json.loads((folder / (key + META)).read_text())
                    float(meta["created"])
                except Exception:
                    meta = None
            stats = [f.stat() for f in files]
            created = float(meta["created"]) if meta else min(s.st_mtime for s in stats)
            found.append(Stored(ns, key, files, sum(s.st_size for s in stats), created,
                                meta.get("fields") if meta else None))
    return sorted(found, key=lambda s: s.created)


def remove(stored: Stored) -> None:
    """Delete an entry: its metadata first (from then on it is a miss), then its value."""
    for f in sorted(stored.files, key=lambda f: not f.name.endswith(META)):
        f.unlink(missing_ok=True)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        for k in ("name", "_target_", "class"):
            if isinstance(value.get(k), str):
                return value[k].rsplit(".", 1)[-1]
        return "x".join(map(str, value["shape"])) if "shape" in value else "{...}"
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 4 else "[" + ",".join(map(_short, value)) + "]"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:10]
    return str(value)


def summary(stored: Stored, width: int = 100) -> str:
    if stored.fields is None:
        return f"{stored.key[:12]} (no metadata: an older layout or an unfinished write; never read)"
    text = " ".join([stored.key[:12], *(f"{k}={_short(v)}" for k, v in stored.fields.items())])
    return text if len(text) <= width else text[:width - 3] + "..."


def human_size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


def human_age(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= DURATION_UNITS[unit]:
            return f"{seconds / DURATION_UNITS[unit]:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def parse_duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `45s`, `2w`, `1.5d` -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not m:
        raise PdqError(f"--older-than={text!r} is not accepted; accepted: a number and a unit, one of "
                       f"{', '.join(DURATION_UNITS)} (seconds, minutes, hours, days, weeks), e.g. 7d or 12h")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


def default_cache_dir() -> str:
    """`paths.cache_dir` of pdq's config.yaml."""
    from omegaconf import OmegaConf

    from pdq.config import CONFIG_NAME, config_dir

    return OmegaConf.load(config_dir() / f"{CONFIG_NAME}.yaml").paths.cache_dir


def select(args: argparse.Namespace) -> list[Stored]:
    """The entries `args` name (checked: cache dir, namespace, duration)."""
    if args.namespace is not None and args.namespace not in NAMESPACES:
        raise PdqError(f"--namespace={args.namespace!r} is unknown; accepted: {', '.join(NAMESPACES)}")
    older = parse_duration(args.older_than) if args.older_than is not None else None
    cache_dir = Path(args.cache_dir if args.cache_dir is not None else default_cache_dir())
    if not cache_dir.is_dir():
        raise PdqError(f"--cache-dir={str(cache_dir)!r} is not a directory; accepted: an existing cache dir "
                       f"(the runs' paths.cache_dir)")
    now = time.time()
    return [s for s in scan(cache_dir, args.namespace) if older is None or now - s.created > older]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdq cache", description="List or prune pdq's result cache (paths.cache_dir).")
    ap.add_argument("command", choices=["list", "prune"],
                    help="list: one line per entry and a total; prune: delete the entries the options select")
    ap.add_argument("--older-than", metavar="DURATION", help="only entries older than this: 7d, 12h, 30m, 2w")
    ap.add_argument("--namespace", metavar="NS", help=f"only this namespace: {', '.join(NAMESPACES)}")
    ap.add_argument("--cache-dir", metavar="DIR", help="the cache dir (default: paths.cache_dir of conf/config.yaml)")
    args = ap.parse_args(argv)
    try:
        if args.command == "prune" and args.older_than is None and args.namespace is None:
            raise PdqError("pdq cache prune removes nothing without a selection; accepted: --older-than DURATION "
                           "and/or --namespace NS")
        chosen = select(args)
    except PdqError as e:
        print(f"pdq cache: error: {e}", file=sys.stderr)
        return 2
    now = time.time()
    for s in chosen:
        if args.command == "prune":
            remove(s)
        print(f"{'removed ' if args.command == 'prune' else ''}{s.namespace:<12} {human_size(s.size):>9} "
              f"{human_age(now - s.created):>7}  {summary(s)}")
    count = f"{len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}"
    print(f"{'removed' if args.command == 'prune' else 'total'}: {count}, {human_size(sum(s.size for s in chosen))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
