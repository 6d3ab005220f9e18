"""Checkpoints of a workdir: orbax steps, the run and model configs, inference loading.

Layout of a workdir::

    config.json            run config (``kvshare eval`` needs no --config)
    model_config.json      ModelConfig, layout as its mapping string ("0_2_2_2")
    tokenizer.model        SentencePiece model (written by ``data.get_tokenizer``)
    checkpoints/<step>/    orbax step: ``params``, ``opt_state`` and ``data_iter`` items,
                           and ``kvshare_checksums.json`` (size and CRC-32 of every file)
    checkpoints_corrupt/   unreadable steps moved aside by a resume

``data_iter`` holds the grain iterator state of every process, so a resumed run sees
the same batches as an uninterrupted one. Manifests, the fallback past unreadable steps
and the one-line save failure: :mod:`kvshare_jax.integrity`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from kvshare_jax import hf_io, integrity, paths
from kvshare_jax.data import Tokenizer, checkpoint_args
from kvshare_jax.layout import KVLayout
from kvshare_jax.model import ModelConfig, Params, init_params

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"


# ------------------------------------------------------------------- configs
def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready fields of ``cfg``; the layout becomes its mapping string."""
    out = dataclasses.asdict(cfg)
    out["layout"] = str(cfg.layout)
    return out


def model_config_from_dict(fields: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**fields, "layout": KVLayout.parse(fields["layout"])})


def save_configs(workdir: str, config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Writes ``config.json`` and ``model_config.json`` (first process only)."""
    if jax.process_index() != 0:
        return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    paths.write_json(root / RUN_CONFIG_FILE, json.loads(config.to_json()), sort_keys=True)
    paths.write_json(root / MODEL_CONFIG_FILE, model_config_to_dict(cfg), sort_keys=True)


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


class Checkpointer:
    """Saves and restores training state; saves are asynchronous (``close`` waits).

    A step's checksum manifest is written once its save has committed: at the next save
    or at ``close``. A failing save (disk full...) raises ``CheckpointSaveError``.
    """

    def __init__(self, workdir: str, max_to_keep: int):
        self.workdir = workdir
        self._manager = _manager(workdir, max_to_keep)
        self._without_manifest: list[int] = []  # committed or in flight
        self.last_complete = self._manager.latest_step()  # newest committed step
        self._failed = False
        integrity.quiet_save_errors()

    def _save_error(self, e: Exception, step: int | str) -> Exception:
        """A ``CheckpointSaveError`` for an I/O failure ``e``, else ``e``."""
        self._failed = True
        return integrity.save_error(e, step, self.workdir, self.last_complete)

    def _finish_saves(self) -> None:
        """Waits for the save in flight, then writes the manifests of finished steps."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an I/O error becomes one message
            pending = self._without_manifest
            error = self._save_error(e, pending[-1] if pending else "?")
            if error is e:
                raise
            raise error from None
        if jax.process_index() == 0:
            for step in self._without_manifest:
                step_dir = self._manager.directory / str(step)
                if not step_dir.exists():  # removed by max_to_keep meanwhile
                    continue
                try:
                    integrity.write_checksums(step_dir)
                except OSError as e:  # the step itself is complete: keep it unverified
                    logging.warning(
                        "cannot write %s of step %d: %s", integrity.CHECKSUM_FILE, step, e
                    )
        if self._without_manifest:
            self.last_complete = self._without_manifest[-1]
        self._without_manifest = []

    def save(self, step: int, params: Params, opt_state: Any, data_iter: Any) -> None:
        """Starts saving ``step``; the iterator state is captured before this returns."""
        self._finish_saves()
        self._without_manifest.append(step)
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

        found = integrity.restore_newest_readable(self._manager, restore)
        if found is None:
            return None
        step, restored = found
        self.last_complete = step
        integrity.quarantine_newer(self._manager, self.workdir, step)
        return step, restored["params"], restored["opt_state"]

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
                integrity.unquiet_save_errors()


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
    ``<path>/tokenizer.json`` (HuggingFace); ``tokenizer.model`` when neither exists."""
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

        found = integrity.restore_newest_readable(manager, restore, items=("params",))
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
