"""Atomic file writes: a crash never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
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


def write_files(out_dir: str | os.PathLike, files: dict[str, Any]) -> list[Path]:
    """Each of `files` (name -> content) written atomically into `out_dir`: str and bytes as they are, anything
    else as JSON."""
    return [atomic_write(Path(out_dir) / name, content) if isinstance(content, (str, bytes))
            else atomic_write_json(Path(out_dir) / name, content) for name, content in files.items()]


@contextlib.contextmanager
def no_space_as_error(out_dir: Path) -> Iterator[None]:
    """A full disk (or quota) while writing into the run dir is one clear error, not an OSError traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from pdq.errors import PdqError

        where = f" ({e.filename})" if e.filename else ""
        raise PdqError(f"no space left to write into the run dir {out_dir}{where}: {e.strerror}; no partial file "
                       f"was left (atomic writes); free space and run again (resume={out_dir} continues a "
                       f"reconstruction run)") from None
