"""Checkpoint integrity (docs/design.md §9): checksum manifests of committed steps, the
fallback past unreadable steps and their quarantine, and one message for a failed save.

- ``checkpoints/<step>/kvshare_checksums.json``: size and CRC-32 of every file of a step,
  written once orbax has committed it; restoring verifies it first, so a flipped bit
  makes the step unreadable like a truncated file (a step without a manifest, from an
  older version or an interrupted save, is restored with a warning).
- Unreadable steps newer than the one restored move to ``checkpoints_corrupt/``.
- A save failing on an OS error (disk full, file-size limit) is one
  :class:`CheckpointSaveError`; orbax's writer threads report it many times, and those
  reports are filtered while a ``Checkpointer`` is open.
"""

from __future__ import annotations

import errno
import json
import logging as logging_std
import os
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from kvshare_jax import paths

CHECKSUM_FILE = "kvshare_checksums.json"
CORRUPT_DIR = "checkpoints_corrupt"


class UnreadableCheckpointError(ValueError):
    """No checkpoint step of a workdir can be restored (one line, exit status 2)."""


class CorruptCheckpointError(ValueError):
    """A step's files do not match its checksum manifest."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, file-size limit...); earlier steps are intact."""


# ----------------------------------------------------------------- checksums
def _crc32(path: epath.Path, chunk: int = 1 << 20) -> str:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _step_files(step_dir: epath.Path) -> list[epath.Path]:
    """Every file under ``step_dir`` but the manifest (and its temporary file)."""
    out = []
    for p in step_dir.iterdir():  # no rglob: GCS paths refuse recursive patterns
        if p.is_dir():
            out += _step_files(p)
        elif CHECKSUM_FILE not in p.name:  # (a temporary one: .NAME.<id>.tmp)
            out.append(p)
    return sorted(out)


def write_checksums(step_dir: epath.Path) -> None:
    """Writes ``<step_dir>/kvshare_checksums.json``: ``{"crc32": {relative path: [size,
    CRC-32 hex]}}`` of every file of a committed step (CRC-32: fast, detects every
    single-bit and burst error of up to 32 bits)."""
    files = {
        str(p.relative_to(step_dir)): [p.stat().length, _crc32(p)] for p in _step_files(step_dir)
    }
    paths.write_json(step_dir / CHECKSUM_FILE, {"crc32": files}, sort_keys=True)


def verify_checksums(step_dir: epath.Path, items: tuple[str, ...] | None = None) -> bool:
    """Checks the files of a step against its manifest (only those under ``items``, plus
    top-level files, when given); raises :class:`CorruptCheckpointError` naming the first
    bad file. False when the step has no manifest (an older or interrupted save)."""
    manifest = step_dir / CHECKSUM_FILE
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["crc32"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{manifest} is unreadable ({e})") from None
    for rel, (size, crc) in sorted(files.items()):
        if items is not None and "/" in rel and rel.split("/")[0] not in items:
            continue
        path = step_dir / rel
        if not path.exists():
            raise CorruptCheckpointError(f"{path} is missing")
        if path.stat().length != size:
            raise CorruptCheckpointError(f"{path} has {path.stat().length} bytes, not {size}")
        if _crc32(path) != crc:
            raise CorruptCheckpointError(f"{path} does not match its checksum")
    return True


# ------------------------------------------------------- unreadable steps
def restore_newest_readable(
    manager: Any, restore: Callable[[int], Any], items: tuple[str, ...] | None = None
) -> tuple[int, Any] | None:
    """Restores the newest step of an orbax ``manager`` that ``restore(step)`` can read,
    newest first, after checking its checksums (of the files under ``items``; all when
    None).

    An unreadable step (e.g. a truncated file or a checksum mismatch) is skipped with a
    warning. If no step can be read, :class:`UnreadableCheckpointError` names the newest
    step's error (often a mismatch with another model config rather than corruption).
    """
    first_error = None
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            if not verify_checksums(manager.directory / str(step), items):
                logging.warning(
                    "checkpoint step %d has no %s (saved by an older version or interrupted "
                    "before it was written): restoring it unverified",
                    step,
                    CHECKSUM_FILE,
                )
            return step, restore(step)
        except Exception as e:  # noqa: BLE001 - any read failure means "unusable step"
            logging.warning("checkpoint step %d is unreadable (%s: %s)", step, type(e).__name__, e)
            first_error = first_error or e
            continue
    if first_error is not None:
        lines = str(first_error).strip().splitlines() or [""]
        reason = f"{type(first_error).__name__}: {lines[0][:300]}"
        raise UnreadableCheckpointError(
            f"no checkpoint in {manager.directory} can be restored (steps "
            f"{', '.join(map(str, steps))}; step {steps[0]}: {reason}); nothing was moved"
        ) from first_error
    return None


def quarantine_newer(manager: Any, workdir: str, step: int) -> None:
    """Moves the steps of ``manager`` newer than the restored ``step`` (unreadable) to
    ``<workdir>/checkpoints_corrupt/``, kept for inspection."""
    bad = [s for s in manager.all_steps() if s > step]
    if not bad:
        return
    logging.warning(
        "falling back to checkpoint step %d; moving unreadable steps %s to %s",
        step,
        bad,
        CORRUPT_DIR,
    )
    if jax.process_index() == 0:
        target = epath.Path(workdir) / CORRUPT_DIR
        target.mkdir(parents=True, exist_ok=True)
        for s in bad:
            (manager.directory / str(s)).rename(target / str(s))
    multihost_utils.sync_global_devices("kvshare_quarantine_checkpoints")
    manager.reload()


# -------------------------------------------------------------- failed saves
# tensorstore (orbax's writer) reports an OS error as a ValueError ending in this
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _io_error(e: BaseException) -> tuple[int | None, str] | None:
    """``(errno, message)`` of the first OS error in ``e``'s cause/context chain or
    exception group (an ``OSError``, or a tensorstore error naming an OS error code);
    None when ``e`` is no I/O failure."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x.errno, str(x)
        if m := _OS_ERROR_CODE.search(str(x)):
            code = int(m.group(1))
            return code, f"[Errno {code}] {os.strerror(code)}"
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


def save_error(e: Exception, step: int | str, workdir: str, last_complete: int | None) -> Exception:
    """A :class:`CheckpointSaveError` for a save of ``step`` failing on an I/O error ``e``
    (naming the cause, a remedy and the newest complete step), else ``e`` itself."""
    found = _io_error(e)
    if found is None:
        return e
    code, message = found
    hint = {
        errno.ENOSPC: "free disk space",
        errno.EDQUOT: "free disk quota",
        errno.EFBIG: "raise the file-size limit (ulimit -f)",
    }.get(code, "fix the filesystem")
    if last_complete is None:
        kept = f"no checkpoint is complete: {hint} and run again"
    else:
        kept = f"step {last_complete} is intact: {hint} and run again to resume from it"
    return CheckpointSaveError(
        f"saving checkpoint step {step} in {workdir} failed ({message}); {kept}"
    )


class _QuietSaveErrors(logging_std.Filter):
    """Drops the ERROR records (with tracebacks, one per writer thread and task) that
    orbax and asyncio log for a save failing on an OS error: the trainer reports it once
    as a :class:`CheckpointSaveError`."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.levelno < logging_std.ERROR:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            if _io_error(record.exc_info[1]) is not None:
                return False
            text += str(record.exc_info[1])
        return not (_OS_ERROR_CODE.search(text) or "Save Finalize thread" in text)


_QUIET = _QuietSaveErrors()
_WRITER_LOGGERS = ("absl", "asyncio")  # where orbax's writer threads report failures


def quiet_save_errors() -> None:
    """Filters the repeated reports of a failing save (until `unquiet_save_errors`)."""
    for name in _WRITER_LOGGERS:
        logging_std.getLogger(name).addFilter(_QUIET)
    _quiet_closed_loops()


def unquiet_save_errors() -> None:
    """Removes `quiet_save_errors`'s log filters."""
    for name in _WRITER_LOGGERS:
        logging_std.getLogger(name).removeFilter(_QUIET)


def _closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_closed_loops() -> None:
    """Hides the "Event loop is closed" errors that tensorstore callbacks report (once
    per write, through ``sys.unraisablehook`` or ``sys.excepthook``) after a failed save
    has closed orbax's event loop; installed once per process."""
    if getattr(sys.unraisablehook, "kvshare_quiet", False):
        return
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(args: Any) -> None:
        if not _closed_loop(args.exc_value):
            unraisable(args)

    def quiet_excepthook(kind: type, value: BaseException, tb: Any) -> None:
        if not _closed_loop(value):
            excepthook(kind, value, tb)

    quiet_unraisable.kvshare_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
