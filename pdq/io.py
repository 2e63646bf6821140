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


def check_writable(out_dir: Path, key: str = "hydra.run.dir") -> None:
    """The run dir (created if need be) takes a file now, not only at the end of the work; `key` is the setting
    that chooses it."""
    from pdq.errors import PdqError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".pdq-write-check-") as f:
            f.write(b"pdq")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PdqError(f"the run dir {out_dir} cannot be written ({e.strerror or type(e).__name__}); accepted: a "
                       f"writable dir ({key}=PATH, or resume= a writable run dir)") from None


def _inside(path: str | os.PathLike | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


@contextlib.contextmanager
def write_errors_as_error(out_dir: Path) -> Iterator[None]:
    """A full disk (or quota) while writing into the run dir, or a run dir that can no longer be written (its
    permissions changed, its file system read-only), is one clear error naming the path, not an OSError traceback:
    the atomic writes leave no partial file, and the saved state (a reconstruction's `recon_state.pt`) as it was."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what, remedy = f"no space left to write into the run dir {out_dir}", "free space"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and _inside(e.filename, out_dir):
            what, remedy = f"the run dir {out_dir} can no longer be written", "make it writable"
        else:
            raise
        from pdq.errors import PdqError

        where = f" ({e.filename})" if e.filename else ""
        raise PdqError(f"{what}{where}: {e.strerror}; no partial file was left and the saved state is intact (atomic "
                       f"writes); {remedy} and run again (resume={out_dir} continues a reconstruction run)") from None
