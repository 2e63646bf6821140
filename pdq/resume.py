"""Resuming a run: what a resumed run must share with the interrupted one (`fingerprint`, `settings_diff`),
the finished results or saved state it continues from, and its records kept in the run's own dir (the wall
time summed over the parts, the CSV rows of earlier parts, the log file)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shlex
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from pdq.checks import flatten
from pdq.config import SAVED_BEFORE, unused_before
from pdq.errors import PdqError, cause
from pdq.io import atomic_write, atomic_write_json

log = logging.getLogger("pdq")

#: the reconstruction state saved after every unit (`pdq.recon.engine`), which a resumed run continues from
STATE_FILE = "recon_state.pt"

#: the accumulated wall time of a run's earlier parts (a resumed run is the sum of its parts)
WALL_FILE = "wall_time.json"

#: where a resumed run keeps the CSV rows of its earlier parts while Lightning's CSVLogger writes a new file
EARLIER_METRICS = ".metrics_earlier.csv"

#: where the caches live: no result depends on it, and the fingerprint leaves it out (a path is not portable)
CACHE_PLACE = ("calib.cache_device", "calib.spill_dir")
#: settings that change no result: a resumed (or finished) run may differ in them
NO_RESULT = {"trainer.log_every_n_steps", *CACHE_PLACE}


def fingerprint(cfg: DictConfig) -> dict:
    """The settings a resumed run must share with the interrupted one: everything that changes the result,
    the trainer (process count, accelerator, determinism) included."""
    keep = ("model", "data", "method", "quant", "calib", "seed", "trainer")
    masked = OmegaConf.masked_copy(cfg, list(keep))
    with open_dict(masked):
        for key in CACHE_PLACE:
            group, name = key.split(".")
            if name in masked[group]:
                del masked[group][name]
    return OmegaConf.to_container(masked, resolve=True)


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def settings_diff(saved: dict | None, cfg: DictConfig, limit: int = 8) -> list[str]:
    """The settings in which `saved` (a fingerprint, or a results.json config) differs from this run's config,
    each as `key: <saved> (saved) vs <now> (now)`."""
    saved, now = saved or {}, fingerprint(cfg)
    diffs = []
    for group in now:
        if group not in saved:
            diffs.append(f"{group}: not recorded (saved) vs {_show(now[group])} (now)")
            continue
        recorded, b = flatten(saved[group], group), flatten(now[group], group)
        a = {**{k: v for k, v in SAVED_BEFORE.items() if k in b}, **recorded}
        for key in sorted((a.keys() | b.keys()) - NO_RESULT):
            if key not in recorded and unused_before(key):
                continue
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append(f"{key}: {_show(a.get(key, '<absent>'))} (saved) vs {_show(b.get(key, '<absent>'))} (now)")
    if len(diffs) > limit:
        diffs = [*diffs[:limit], f"... and {len(diffs) - limit} more"]
    return diffs


def resume_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir if cfg.resume == "auto" else cfg.resume).expanduser()


def finished_results(cfg: DictConfig) -> dict | None:
    """With `resume=auto` or `resume=<dir>`: the `results.json` already in that dir, when the same settings
    made it (the run is finished: nothing to do, and the file is left as it is)."""
    if not cfg.resume:
        return None
    path = resume_dir(cfg) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PdqError(f"resume={cfg.resume}: {path} is not valid JSON ({e}); remove it to run this job "
                       f"again") from None
    diff = settings_diff(results.get("config") if isinstance(results, dict) else None, cfg)
    if diff:
        raise PdqError(f"resume={cfg.resume}: {path} holds the results of other settings ({'; '.join(diff)}); "
                       f"give this run another dir (hydra.run.dir / hydra.sweep.dir) or remove that one")
    return results


def read_state(path: Path, resume: str) -> dict:
    """A saved reconstruction state, or one clear error when the file is cut short, empty or not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PdqError(f"resume={resume}: {path} is truncated or corrupt ({cause(e, 160)}); remove it to start "
                       f"this run afresh") from None
    if not isinstance(state, dict) or not {"units", "state_dict", "fingerprint"} <= state.keys():
        raise PdqError(f"resume={resume}: {path} is not a saved reconstruction state (no units, state_dict and "
                       f"fingerprint); remove it to start this run afresh")
    return state


def writes_to(cfg: DictConfig) -> Path:
    """The run's dir: the interrupted run's when it resumes one (`resume=auto`: its own), else its output dir."""
    return resume_dir(cfg) if cfg.resume else Path(cfg.paths.output_dir)


def load_resume_state(cfg: DictConfig) -> tuple[Path, dict | None]:
    """(output dir, saved state or None). A resumed run writes into the interrupted run's dir; `resume=auto`
    resumes from this run's own dir when it holds a saved state, and starts afresh otherwise."""
    run_dir = writes_to(cfg)
    if not cfg.resume:
        return run_dir, None
    if cfg.resume == "auto" and not (run_dir / STATE_FILE).is_file():
        return run_dir, None
    state = read_state(run_dir / STATE_FILE, cfg.resume)
    diff = settings_diff(state.get("fingerprint"), cfg)
    if diff:
        raise PdqError(f"resume={cfg.resume}: the interrupted run in {run_dir} was made with other settings "
                       f"({'; '.join(diff)}); resume with the interrupted run's overrides")
    return run_dir, state


def saved_unit(run_dir: Path) -> tuple[int, int] | None:
    """(phase, unit) of the last unit the state saved in `run_dir` holds, or None where there is no readable
    one (read memory-mapped: the state dict's tensors are not loaded)."""
    try:
        state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return int(state["phase"]), int(state["index"])
    except Exception:  # missing, cut short, not a saved state
        return None


def interrupted_message(cfg: DictConfig) -> str:
    """What an interrupted run (Ctrl-C) leaves, in one line: the saved state it resumes from, and the command
    that resumes it (the `pdq` command with this run's overrides, from Hydra), or that there is nothing to resume."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = writes_to(cfg)
    saved = saved_unit(run_dir)
    if saved is None:
        return "interrupted before any unit finished; nothing to resume"
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
        how = f"`{shlex.join(['pdq', *overrides, f'resume={run_dir}'])}`"
    else:
        how = f"the same settings and resume={run_dir}"
    return (f"interrupted: saved {STATE_FILE} after phase {saved[0]} unit {saved[1]} in {run_dir}; resume with "
            f"{how}")


def _metrics_files(logger) -> tuple[Path, Path] | None:
    from lightning.pytorch.loggers import CSVLogger

    log_dir = getattr(logger, "log_dir", None)
    if not isinstance(logger, CSVLogger) or not log_dir:
        return None
    return Path(log_dir) / "metrics.csv", Path(log_dir).parent / EARLIER_METRICS


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _concat_csv(first: Path, second: Path, into: Path) -> None:
    """The rows of `first` then `second` (either may be missing) written atomically into `into`, with the
    union of their columns; the source that is not `into` is removed."""
    rows, fields = _read_csv(first) if first.is_file() else ([], [])
    more, more_fields = _read_csv(second) if second.is_file() else ([], [])
    _write_csv(into, rows + more, sorted(set(fields) | set(more_fields)))
    (second if into == first else first).unlink(missing_ok=True)


def keep_earlier_metrics(logger) -> None:
    """Lightning's CSVLogger deletes the metrics.csv it finds in its dir. A resumed run first moves the rows of
    the interrupted part aside (after those of still earlier parts); `merge_metrics` puts them back in front."""
    files = _metrics_files(logger)
    if files is not None and files[0].is_file():
        current, earlier = files
        _concat_csv(earlier, current, into=earlier)


def merge_metrics(logger) -> None:
    files = _metrics_files(logger)
    if files is not None and files[1].is_file():
        current, earlier = files
        _concat_csv(earlier, current, into=current)


@contextlib.contextmanager
def records_in(out_dir: Path, job_dir: Path) -> Iterator[None]:
    """A run resumed in another run's dir logs there too: Hydra's log file is in this job's own new dir, so
    each of its file handlers gets a twin appending to the same file name in `out_dir`."""
    root, added = logging.getLogger(), []
    if out_dir.resolve() != job_dir.resolve():
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == job_dir.resolve():
                twin = logging.FileHandler(out_dir / Path(handler.baseFilename).name, mode="a")
                twin.setFormatter(handler.formatter)
                twin.setLevel(handler.level)
                root.addHandler(twin)
                added.append(twin)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


def begin_part(out_dir: Path, resumed: bool, t0: float) -> float:
    """Record this part's start in WALL_FILE and return the wall seconds of the run's earlier parts: each
    interrupted part counts from its start to its last saved unit (the save time of STATE_FILE)."""
    path, before = out_dir / WALL_FILE, 0.0
    if resumed:
        try:
            record = json.loads(path.read_text())
            saved_at = (out_dir / STATE_FILE).stat().st_mtime
            before = float(record["before_s"]) + max(0.0, saved_at - float(record["started"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s could not be read (%s): wall_s counts this part only", path, type(e).__name__)
    atomic_write_json(path, {"before_s": round(before, 3), "started": t0})
    return before

