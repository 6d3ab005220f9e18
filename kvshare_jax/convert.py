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
import functools
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from kvshare_jax import checkpoint, hf_io
from kvshare_jax.config import default_config
from kvshare_jax.layout import KVLayout, from_spec
from kvshare_jax.model import ModelConfig, Params, init_params

MODEL_TYPES = ("llama", "lckv-llama")
KV_INITS = ("copy", "average")
REFERENCE_SLIDING_WINDOW = 4096  # LCKVLlamaConfig's default window
TOKENIZER_FILE = "tokenizer.model"

_LAYER = "model.layers.{}."
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))


# ------------------------------------------------------------------- configs
def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base of a v4 (``rope_theta``/``rope_scaling``) or v5 (``rope_parameters``)
    config; scaled RoPE variants are refused, since our RoPE has no scaling."""
    params = hf.get("rope_parameters") or {}
    for scaling in (hf.get("rope_scaling"), params):
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind != "default":
            raise ValueError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is supported")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a HF ``config.json`` (``llama`` or ``lckv-llama``)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}"
        )
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"unsupported {key}={hf[key]!r}: only {want!r} is supported")
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    if hf.get("force_nodiag"):
        raise ValueError("unsupported force_nodiag=true (masks the diagonal in every layer)")
    num_layers, d, n = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // n
    window = 0
    layout = KVLayout(tuple(range(num_layers)))
    if model_type == "lckv-llama":
        if hf.get("layer_types"):
            layout = KVLayout.parse(hf["layer_types"], num_layers)
        window = int(hf.get("sliding_window") or 0)
        if any(layout.sliding) and window < 1:
            window = REFERENCE_SLIDING_WINDOW
    return ModelConfig(
        layout=layout,
        vocab_size=hf.get("vocab_size", 32000),
        d_model=d,
        num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=0 if head_dim == d // n else head_dim,
        d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        forward_passes=hf.get("forward_passes", 7),
        backward_passes=hf.get("backward_passes", 2),
        sliding_window=window,
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_impl="auto",
    )


def is_standard(layout: KVLayout) -> bool:
    """Whether ``layout`` is a plain transformer (exportable as ``llama``)."""
    return layout.targets == tuple(range(layout.num_layers)) and not any(layout.sliding)


def hf_config_from_model(cfg: ModelConfig, special_ids: dict[str, int] | None = None) -> dict:
    """A HF ``config.json`` for ``cfg``: ``llama`` for the standard layout, else
    ``lckv-llama`` with ``layer_types``, ``forward_passes``, ``backward_passes`` and
    ``sliding_window``. ``special_ids`` adds ``bos/eos/pad_token_id``."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hd,
        "max_position_embeddings": cfg.max_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        **(special_ids or {}),
    }
    if not is_standard(cfg.layout):
        out["architectures"] = ["LCKVLlamaForCausalLM"]
        out["model_type"] = "lckv-llama"
        out["layer_types"] = str(cfg.layout)
        out["forward_passes"] = cfg.forward_passes
        out["backward_passes"] = cfg.backward_passes
        out["sliding_window"] = cfg.sliding_window or REFERENCE_SLIDING_WINDOW
    return out


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


# ------------------------------------------------------------------- tensors
def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Our params tree from HF tensors; raises ``ValueError`` on a missing, misshaped or
    unexpected tensor."""
    tensors = dict(tensors)
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    qh, kvh = cfg.num_heads * cfg.hd, cfg.num_kv_heads * cfg.hd

    def take(name: str, shape: tuple[int, ...]) -> jax.Array:
        if name not in tensors:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        t = tensors.pop(name)
        if t.shape != shape:
            raise ValueError(f"tensor {name} has shape {t.shape}, expected {shape}")
        return jnp.asarray(t, jnp.float32)

    def kernel(name: str, out_in: tuple[int, int]) -> dict[str, jax.Array]:
        return {"kernel": take(name, out_in).T}

    tree: dict[str, Any] = {"embed": {"embedding": take("model.embed_tokens.weight", (v, d))}}
    shapes = {"q_proj": (qh, d), "k_proj": (kvh, d), "v_proj": (kvh, d), "o_proj": (d, qh)}
    shapes |= {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    for i in range(cfg.num_layers):
        p = _LAYER.format(i)
        layer = {ours: {"scale": take(f"{p}{hf}.weight", (d,))} for ours, hf in _NORMS}
        for name in _ATTN:
            if name in ("k_proj", "v_proj") and not cfg.layout.is_kv_layer(i):
                continue
            layer[name] = kernel(f"{p}self_attn.{name}.weight", shapes[name])
        for name in _MLP:
            layer[name] = kernel(f"{p}mlp.{name}.weight", shapes[name])
        tree[f"layer_{i}"] = layer
    tree["final_norm"] = {"scale": take("model.norm.weight", (d,))}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    else:
        tree["lm_head"] = kernel("lm_head.weight", (v, d))
    extra = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ValueError(f"unexpected tensors for this config: {', '.join(extra[:3])}{more}")
    return {"params": tree}


def params_to_hf(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF tensors (fp32 numpy) of our params tree; non-KV layers get no ``k/v_proj``."""
    tree = jax.device_get(params["params"])
    out = {"model.embed_tokens.weight": tree["embed"]["embedding"]}
    for i in range(cfg.num_layers):
        p, layer = _LAYER.format(i), tree[f"layer_{i}"]
        for ours, hf in _NORMS:
            out[f"{p}{hf}.weight"] = layer[ours]["scale"]
        for name in _ATTN:
            if name in layer:
                out[f"{p}self_attn.{name}.weight"] = layer[name]["kernel"].T
        for name in _MLP:
            out[f"{p}mlp.{name}.weight"] = layer[name]["kernel"].T
    out["model.norm.weight"] = tree["final_norm"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tree["lm_head"]["kernel"].T
    return {k: np.asarray(x, np.float32) for k, x in out.items()}


def read_hf(hf_dir: str) -> tuple[ModelConfig, Params]:
    """``(ModelConfig, params)`` of a HF ``llama``/``lckv-llama`` directory (fp32)."""
    cfg = model_config_from_hf(hf_io.read_config(hf_dir))
    return cfg, params_from_hf(cfg, hf_io.read_tensors(hf_dir))


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
    if kv_init not in KV_INITS:
        raise ValueError(f"unknown kv init {kv_init!r}: expected one of {', '.join(KV_INITS)}")
    if layout.num_layers != cfg.num_layers:
        raise ValueError(f"layout has {layout.num_layers} layers, the model {cfg.num_layers}")
    window = sliding_window or cfg.sliding_window
    if any(layout.sliding) and window < 1:
        raise ValueError(f"layout {layout} has sliding-window layers: pass --sliding-window")
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


# ------------------------------------------------------------------- workdirs
def _check_fresh(workdir: str) -> str:
    """The checkpoint dir of ``workdir``; ``FileExistsError`` if it already holds a model."""
    ckpt_dir = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
    config_file = os.path.join(workdir, checkpoint.MODEL_CONFIG_FILE)
    if os.path.exists(config_file) or (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        raise FileExistsError(f"{workdir} already holds a model; use a new --workdir")
    return ckpt_dir


def save_workdir(workdir: str, cfg: ModelConfig, params: Params, tokenizer: str = "") -> None:
    """Writes ``cfg``/``params`` as a fresh workdir (step 0, params only); copies the
    SentencePiece ``tokenizer`` file to ``<workdir>/tokenizer.model`` when given."""
    ckpt_dir = _check_fresh(workdir)
    checkpoint.save_configs(workdir, run_config_for(cfg), cfg)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(workdir, TOKENIZER_FILE))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))


def _is_workdir(path: str) -> bool:
    if os.path.exists(os.path.join(path, checkpoint.MODEL_CONFIG_FILE)):
        return True
    if os.path.exists(os.path.join(path, hf_io.CONFIG_FILE)):
        return False
    raise FileNotFoundError(f"{path} is neither a workdir nor a HuggingFace model dir")


def init_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a workdir or HF directory, without reading any weights."""
    if _is_workdir(path):
        return checkpoint.load_model_config(path)
    return model_config_from_hf(hf_io.read_config(path))


def load_init_params(path: str, shardings: Params | None = None) -> tuple[ModelConfig, Params]:
    """``(ModelConfig, params)`` to start training from: the newest checkpoint of a
    workdir (converted or trained), or a HF ``llama``/``lckv-llama`` directory.

    ``shardings`` (a tree of ``jax.sharding.Sharding`` like the params) places the
    params; default: the first device.
    """
    if not _is_workdir(path):
        cfg, params = read_hf(path)
        return cfg, jax.device_put(params, shardings or jax.devices()[0])
    cfg = checkpoint.load_model_config(path)
    abstract = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    ckpt_dir = os.path.join(os.path.abspath(path), checkpoint.CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        return cfg, manager.restore(step, args=args)["params"]


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
    and with another ``sliding_window``. Returns the model config."""
    _check_fresh(workdir)
    cfg, params = read_hf(hf_dir)
    if layout or sliding_window:
        target = from_spec(layout, cfg.num_layers) if layout else cfg.layout
        cfg, params = relayout(cfg, params, target, kv_init, sliding_window)
    tokenizer = os.path.join(hf_dir, TOKENIZER_FILE)
    save_workdir(workdir, cfg, params, tokenizer if os.path.exists(tokenizer) else "")
    return cfg


def export_hf(workdir: str, out_dir: str) -> dict[str, Any]:
    """Writes the newest checkpoint of ``workdir`` as a HF directory (``config.json``,
    ``model.safetensors``, and ``tokenizer.model`` if the workdir has one). Returns the
    written ``config.json``."""
    cfg, params = load_init_params(workdir)
    tokenizer = os.path.join(workdir, TOKENIZER_FILE)
    special: dict[str, int] = {}
    if os.path.exists(tokenizer):
        from kvshare_jax.data import Tokenizer

        tok = Tokenizer.load(tokenizer)
        ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
        special = {f"{k}_token_id": i for k, i in ids.items() if i >= 0}
    hf = hf_config_from_model(cfg, special)
    hf_io.write_dir(out_dir, hf, params_to_hf(cfg, params))
    if os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER_FILE))
    return hf
