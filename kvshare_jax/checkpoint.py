"""Checkpoints of a workdir: orbax steps, the run and model configs, inference loading.

Layout of a workdir::

    config.json            run config (``kvshare eval`` needs no --config)
    model_config.json      ModelConfig, layout as its mapping string ("0_2_2_2")
    tokenizer.model        SentencePiece model (written by ``data.get_tokenizer``)
    checkpoints/<step>/    orbax step: ``params``, ``opt_state`` and ``data_iter`` items,
                           and ``kvshare_checksums.json`` (size and CRC-32 of every file)
    checkpoints_corrupt/   unreadable steps moved aside by a resume

``data_iter`` holds the grain iterator state of every process, so a resumed run sees
the same batches as an uninterrupted one. The checksum manifest is written once orbax
has committed the step; restoring verifies it first, so a flipped bit makes the step
unreadable (a step without a manifest is restored with a warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging as logging_std
import os
import re
import sys
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from kvshare_jax import hf_io, paths
from kvshare_jax.data import Tokenizer, checkpoint_args
from kvshare_jax.layout import KVLayout
from kvshare_jax.model import ModelConfig, Params, init_params

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
RUN_CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKSUM_FILE = "kvshare_checksums.json"


class UnreadableCheckpointError(ValueError):
    """No checkpoint step of a workdir can be restored (one line, exit status 2)."""


class CorruptCheckpointError(ValueError):
    """A step's files do not match its checksum manifest."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, file-size limit...); earlier steps are intact."""


# ------------------------------------------------------------------- configs
def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready fields of ``cfg``; the layout becomes its mapping string."""
    out = dataclasses.asdict(cfg)
    out["layout"] = str(cfg.layout)
    return out


def model_config_from_dict(fields: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**fields, "layout": KVLayout.parse(fields["layout"])})


def _write_json(path: epath.Path, obj: Any) -> None:
    paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_configs(workdir: str, config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Writes ``config.json`` and ``model_config.json`` (first process only)."""
    if jax.process_index() != 0:
        return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / RUN_CONFIG_FILE, json.loads(config.to_json()))
    _write_json(root / MODEL_CONFIG_FILE, model_config_to_dict(cfg))


def _read_json(workdir: str, name: str) -> Any:
    path = epath.Path(workdir) / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a training workdir "
            "(create one with `kvshare train --config ... --workdir ...`)"
        )
    return json.loads(path.read_text())


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run config saved by ``kvshare train`` in ``workdir``."""
    return ml_collections.ConfigDict(_read_json(workdir, RUN_CONFIG_FILE))


def load_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig saved by ``kvshare train`` in ``workdir``."""
    return model_config_from_dict(_read_json(workdir, MODEL_CONFIG_FILE))


# --------------------------------------------------------------- checkpoints
def _manager(workdir: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """Orbax manager of ``<workdir>/checkpoints`` (local paths or e.g. ``gs://``).

    Only a trainer (``max_to_keep`` given) creates the directory, saves asynchronously
    and removes temporary directories left by an interrupted save; a reader must not.
    """
    writer = max_to_keep is not None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=writer,
        enable_async_checkpointing=writer,
        cleanup_tmp_directories=writer,
    )
    return ocp.CheckpointManager(epath.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


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
    _write_json(step_dir / CHECKSUM_FILE, {"crc32": files})


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


def _restore_newest_readable(
    manager: ocp.CheckpointManager,
    restore: Callable[[int], Any],
    items: tuple[str, ...] | None = None,
) -> tuple[int, Any] | None:
    """Restores the newest step that ``restore(step)`` can read, newest first, after
    checking its checksums (of the files under ``items``; all when None).

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


class Checkpointer:
    """Saves and restores training state; saves are asynchronous (``close`` waits).

    A step's checksum manifest is written once its save has committed: at the next save
    or at ``close``. A failing save (disk full...) raises :class:`CheckpointSaveError`.
    """

    def __init__(self, workdir: str, max_to_keep: int):
        self.workdir = workdir
        self._manager = _manager(workdir, max_to_keep)
        self._unsummed: list[int] = []  # committed or in flight, no manifest yet
        self.last_complete = self._manager.latest_step()  # newest committed step
        self._failed = False
        for name in ("absl", "asyncio"):  # orbax's writer threads report failures here
            logging_std.getLogger(name).addFilter(_QUIET)
        _quiet_closed_loops()

    def _save_error(self, e: Exception, step: int | str) -> Exception:
        """A :class:`CheckpointSaveError` for an I/O failure ``e``, else ``e``."""
        self._failed = True
        found = _io_error(e)
        if found is None:
            return e
        code, message = found
        hint = {
            errno.ENOSPC: "free disk space",
            errno.EDQUOT: "free disk quota",
            errno.EFBIG: "raise the file-size limit (ulimit -f)",
        }.get(code, "fix the filesystem")
        if self.last_complete is None:
            kept = f"no checkpoint is complete: {hint} and run again"
        else:
            kept = f"step {self.last_complete} is intact: {hint} and run again to resume from it"
        return CheckpointSaveError(
            f"saving checkpoint step {step} in {self.workdir} failed ({message}); {kept}"
        )

    def _finish_saves(self) -> None:
        """Waits for the save in flight, then writes the manifests of finished steps."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an I/O error becomes one message
            error = self._save_error(e, self._unsummed[-1] if self._unsummed else "?")
            if error is e:
                raise
            raise error from None
        if jax.process_index() == 0:
            for step in self._unsummed:
                step_dir = self._manager.directory / str(step)
                if not step_dir.exists():  # removed by max_to_keep meanwhile
                    continue
                try:
                    write_checksums(step_dir)
                except OSError as e:  # the step itself is complete: keep it unverified
                    logging.warning("cannot write %s of step %d: %s", CHECKSUM_FILE, step, e)
        if self._unsummed:
            self.last_complete = self._unsummed[-1]
        self._unsummed = []

    def save(self, step: int, params: Params, opt_state: Any, data_iter: Any) -> None:
        """Starts saving ``step``; the iterator state is captured before this returns."""
        self._finish_saves()
        self._unsummed.append(step)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    data_iter=checkpoint_args(data_iter),
                ),
            )
        except Exception as e:  # noqa: BLE001 - a synchronous part of the save failed
            error = self._save_error(e, step)
            if error is e:
                raise
            raise error from None

    def restore(
        self, abstract_params: Params, abstract_opt_state: Any, data_iter: Any
    ) -> tuple[int, Params, Any] | None:
        """Restores the newest readable step into the given abstract (sharded) trees and
        ``data_iter``; unreadable newer steps are moved to ``checkpoints_corrupt/``.
        Returns ``(step, params, opt_state)``, or None when there is no checkpoint."""

        def restore(step: int) -> Any:
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    data_iter=checkpoint_args(data_iter, restore=True),
                ),
            )

        found = _restore_newest_readable(self._manager, restore)
        if found is None:
            return None
        step, restored = found
        self.last_complete = step
        bad = [s for s in self._manager.all_steps() if s > step]
        if bad:
            logging.warning(
                "falling back to checkpoint step %d; moving unreadable steps %s to %s",
                step,
                bad,
                CORRUPT_DIR,
            )
            self._quarantine(bad)
        return step, restored["params"], restored["opt_state"]

    def _quarantine(self, steps: list[int]) -> None:
        """Moves ``steps`` to ``<workdir>/checkpoints_corrupt/`` (kept for inspection)."""
        if jax.process_index() == 0:
            target = epath.Path(self.workdir) / CORRUPT_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step in steps:
                (self._manager.directory / str(step)).rename(target / str(step))
        multihost_utils.sync_global_devices("kvshare_quarantine_checkpoints")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves, writes their manifests and releases the manager;
        after a failed save it only releases the manager (the failure was raised).
        Closing twice is a no-op."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if not self._failed:
                self._finish_saves()
        finally:
            if self._failed:
                with contextlib.suppress(Exception):  # the save failure was raised
                    self._manager.close()
            else:
                self._manager.close()
                for name in ("absl", "asyncio"):
                    logging_std.getLogger(name).removeFilter(_QUIET)


# ----------------------------------------------------------------- model directories
class OpenModel(NamedTuple):
    """A model opened from a directory (see :func:`open_model`)."""

    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None  # None when the directory has none (and none was required)
    step: int | None  # the checkpoint step; None for a HuggingFace directory


def is_workdir(path: str) -> bool:
    """True for a workdir (trained or converted), False for a HuggingFace model
    directory; ``FileNotFoundError`` for anything else."""
    if (epath.Path(path) / MODEL_CONFIG_FILE).exists():
        return True
    if (epath.Path(path) / hf_io.CONFIG_FILE).exists():
        return False
    raise FileNotFoundError(f"{path} is neither a workdir nor a HuggingFace model dir")


def model_config_of(path: str) -> ModelConfig:
    """The ModelConfig of a workdir or HuggingFace directory, reading no weights."""
    if is_workdir(path):
        return load_model_config(path)
    return hf_io.model_config_from_hf(hf_io.read_config(path))


def tokenizer_file(path: str) -> epath.Path:
    """Where the tokenizer of a model directory is: a workdir's ``data.tokenizer_path``
    when its run set one, else ``<path>/tokenizer.model`` (SentencePiece), else
    ``<path>/tokenizer.json`` (HuggingFace); the former when neither exists."""
    run_config = epath.Path(path) / RUN_CONFIG_FILE
    if is_workdir(path) and run_config.exists():
        tokenizer_path = load_run_config(path).data.tokenizer_path
        if tokenizer_path:
            return epath.Path(tokenizer_path)
    from kvshare_jax.data.tokenizer import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (epath.Path(path) / name).exists():
            return epath.Path(path) / name
    return epath.Path(path) / TOKENIZER_FILE


def open_model(path: str, shardings: Any = None, need_tokenizer: bool = False) -> OpenModel:
    """Opens a workdir (trained or converted: its newest readable checkpoint, falling
    back past unreadable steps) or a HuggingFace ``llama``/``lckv-llama`` directory.

    Only the parameters are restored, placed by ``shardings`` (a tree like the params;
    default: this process's first device). The tokenizer is loaded when the directory
    has one; ``need_tokenizer`` makes its absence a ``FileNotFoundError``.
    """
    if not is_workdir(path):
        cfg, params = hf_io.read_hf(path)
        params = jax.device_put(params, shardings or jax.local_devices()[0])
        step = None
    else:
        cfg = load_model_config(path)
        abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
        manager = _manager(path)

        def restore(step: int) -> Params:
            args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
            return manager.restore(step, args=args)["params"]

        found = _restore_newest_readable(manager, restore, items=("params",))
        manager.close()
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint in {epath.Path(path) / CHECKPOINT_DIR}: train first with "
                f"`kvshare train --config ... --workdir {path}`"
            )
        step, params = found
    tokenizer = tokenizer_file(path)
    if not tokenizer.exists():
        if need_tokenizer:
            raise FileNotFoundError(f"tokenizer {tokenizer} of {path} not found")
        return OpenModel(cfg, params, None, step)
    from kvshare_jax.data.tokenizer import load_tokenizer  # SentencePiece or tokenizer.json

    return OpenModel(cfg, params, load_tokenizer(tokenizer), step)
