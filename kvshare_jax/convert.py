"""HuggingFace interop: Llama and reference LCKV (``lckv-llama``) checkpoints <-> workdirs.

Shapes: L layers, v vocabulary, d model dim, n query heads, k KV heads, h head dim,
f MLP width. HF linear weights are ``[out, in]``; our Dense kernels are ``[in, out]``
(the transpose). Tensor names per layer ``i`` (``model.layers.{i}.``):
``self_attn.{q,k,v,o}_proj.weight``, ``mlp.{gate,up,down}_proj.weight``,
``input_layernorm.weight``, ``post_attention_layernorm.weight``; plus
``model.embed_tokens.weight``, ``model.norm.weight`` and ``lm_head.weight`` (absent when
tied). ``lckv-llama`` layers that are not KV layers have no ``k_proj``/``v_proj``.

Importing writes a workdir in the layout of ``checkpoint.py`` (``model_config.json``,
``config.json``, an orbax ``checkpoints/0`` holding only ``params``), which
``kvshare eval/generate`` read and ``kvshare train --init-from`` starts from.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from kvshare_jax import checkpoint, hf_export, hf_io, integrity, paths
from kvshare_jax.config import default_config
from kvshare_jax.data.tokenizer import TOKENIZER_EXTRAS, TOKENIZER_FILES, load_tokenizer
from kvshare_jax.layout import KVLayout, from_spec
from kvshare_jax.model import ModelConfig, Params

KV_INITS = ("copy", "average")


def run_config_for(cfg: ModelConfig) -> ml_collections.ConfigDict:
    """The default run config with its ``model`` section (and vocabulary) set to ``cfg``."""
    config = default_config()
    for field in dataclasses.fields(cfg):
        if field.name not in ("layout", "vocab_size"):
            config.model[field.name] = getattr(cfg, field.name)
    config.model.layout = str(cfg.layout)
    config.model.num_layers = cfg.num_layers
    config.data.vocab_size = cfg.vocab_size
    config.train.seq_len = min(config.train.seq_len, cfg.max_len)
    return config


# -------------------------------------------------------------------- layouts
def relayout(
    cfg: ModelConfig,
    params: Params,
    layout: KVLayout,
    kv_init: str = "copy",
    sliding_window: int | None = None,
) -> tuple[ModelConfig, Params]:
    """Moves a model to another KV layout (for uptraining).

    A layer's K/V weights in the source are those of its source target. ``copy``: each
    new KV layer keeps its own; ``average``: each new KV layer gets the mean over all
    layers that read it (MLKV-style init). Other weights are unchanged; K/V weights of
    layers that stop being KV layers are dropped. A layout with sliding-window layers
    needs ``sliding_window`` or a window in ``cfg``.
    """
    window = check_relayout(cfg, layout, kv_init, sliding_window)
    tree = params["params"]

    def source_kv(i: int, name: str) -> jax.Array:  # [d, k*h]
        return tree[f"layer_{cfg.layout.targets[i]}"][name]["kernel"]

    new = {
        k: {n: w for n, w in sub.items() if n not in ("k_proj", "v_proj")}
        for k, sub in tree.items()
    }
    for j in layout.kv_layers:
        readers = (
            [i for i, t in enumerate(layout.targets) if t == j] if kv_init == "average" else [j]
        )
        for name in ("k_proj", "v_proj"):
            stacked = jnp.stack([source_kv(i, name) for i in readers])  # [r, d, k*h]
            new[f"layer_{j}"][name] = {"kernel": jnp.mean(stacked, axis=0)}
    return dataclasses.replace(cfg, layout=layout, sliding_window=window), {"params": new}


def check_relayout(
    cfg: ModelConfig, layout: KVLayout, kv_init: str, sliding_window: int | None
) -> int:
    """``ValueError`` when :func:`relayout` cannot move ``cfg`` to ``layout``; returns the
    sliding window of the result."""
    if kv_init not in KV_INITS:
        raise ValueError(f"unknown kv init {kv_init!r}: expected one of {', '.join(KV_INITS)}")
    if layout.num_layers != cfg.num_layers:
        raise ValueError(f"layout has {layout.num_layers} layers, the model {cfg.num_layers}")
    window = sliding_window or cfg.sliding_window
    if any(layout.sliding) and window < 1:
        raise ValueError(f"layout {layout} has sliding-window layers: pass --sliding-window")
    return window


# ------------------------------------------------------------------- workdirs
def _check_fresh(workdir: str) -> epath.Path:
    """The checkpoint dir of ``workdir``; ``FileExistsError`` if it already holds a model."""
    root = epath.Path(paths.absolute(workdir))
    ckpt_dir = root / checkpoint.CHECKPOINT_DIR
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if (root / checkpoint.MODEL_CONFIG_FILE).exists() or has_ckpt:
        raise FileExistsError(f"{workdir} already holds a model; use a new --workdir")
    return ckpt_dir


def tokenizer_files(folder: str) -> list[str]:
    """The tokenizer files in ``folder`` (``tokenizer.model`` and/or ``tokenizer.json``,
    with ``tokenizer_config.json``/``special_tokens_map.json`` when one of them is there)."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if found:
        found += [n for n in TOKENIZER_EXTRAS if os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in found]


def save_workdir(
    workdir: str, cfg: ModelConfig, params: Params, tokenizer: str | list[str] = ""
) -> None:
    """Writes ``cfg``/``params`` as a fresh workdir (step 0, params only); copies the
    ``tokenizer`` file(s) into it: a SentencePiece file given alone becomes
    ``tokenizer.model``, a list of files keeps their names."""
    ckpt_dir = _check_fresh(workdir)
    checkpoint.save_configs(workdir, run_config_for(cfg), cfg)
    if isinstance(tokenizer, str):
        tokenizer = [tokenizer] if tokenizer else []
        names = [checkpoint.TOKENIZER_FILE] * len(tokenizer)
    else:
        names = [os.path.basename(t) for t in tokenizer]
    for path, name in zip(tokenizer, names, strict=True):
        epath.Path(path).copy(epath.Path(workdir) / name, overwrite=True)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    integrity.write_checksums(ckpt_dir / "0")  # verified when the workdir is opened


# ---------------------------------------------------------------- import/export
def import_hf(
    hf_dir: str,
    workdir: str,
    layout: str = "",
    kv_init: str = "copy",
    sliding_window: int | None = None,
) -> ModelConfig:
    """Converts a HF directory into a new workdir, optionally into another ``layout``
    (a preset or mapping string, see ``layout.from_spec``; K/V weights by ``kv_init``)
    and with another ``sliding_window``. Returns the model config. Everything that can
    be checked is checked before the tensors are converted (with a progress bar)."""
    _check_fresh(workdir)
    cfg = hf_io.model_config_from_hf(hf_io.read_config(hf_dir))
    moved = bool(layout or sliding_window)
    target = from_spec(layout, cfg.num_layers) if layout else cfg.layout
    if moved:
        check_relayout(cfg, target, kv_init, sliding_window)
    tokenizers = tokenizer_files(hf_dir)
    if tokenizers:  # check it loads before any work
        load_tokenizer(hf_dir)
    params = hf_io.params_from_hf(cfg, hf_io.read_tensors(hf_dir), show_progress=True)
    if moved:
        cfg, params = relayout(cfg, params, target, kv_init, sliding_window)
    save_workdir(workdir, cfg, params, tokenizers)
    return cfg


def export_hf(workdir: str, out_dir: str) -> dict[str, Any]:
    """Writes the newest checkpoint of ``workdir`` as a HF directory (``config.json``,
    ``model.safetensors``, the tokenizer files of the workdir, and for a shared-KV
    layout the PyTorch modeling files that ``config.json``'s ``auto_map`` names).
    Returns the written ``config.json``."""
    cfg, params, tok, _ = checkpoint.open_model(workdir)
    special: dict[str, int] = {}
    if tok is not None:
        ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
        special = {f"{k}_token_id": i for k, i in ids.items() if i >= 0}
    hf = hf_io.hf_config_from_model(cfg, special)
    if not hf_io.is_standard(cfg.layout):
        hf["auto_map"] = dict(hf_export.AUTO_MAP)
    hf_io.write_dir(out_dir, hf, hf_io.params_to_hf(cfg, params, show_progress=True))
    if not hf_io.is_standard(cfg.layout):
        for path in hf_export.paths():
            shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    tokenizers = tokenizer_files(workdir)
    if not tokenizers and tok is not None:  # the run's data.tokenizer_path
        tokenizers = [str(checkpoint.tokenizer_file(workdir))]
    for path in tokenizers:
        name = os.path.basename(path)
        if name not in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
            name = "tokenizer.json" if name.endswith(".json") else checkpoint.TOKENIZER_FILE
        shutil.copyfile(path, os.path.join(out_dir, name))
    return hf
