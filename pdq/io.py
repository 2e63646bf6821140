"""Atomic file writes: a crash never leaves a half-written artifact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    return _atomic(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return _atomic(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # imported here so that `pdq.report` (which needs only the text writers) stays light

    return _atomic(path, lambda f: torch.save(obj, f))
