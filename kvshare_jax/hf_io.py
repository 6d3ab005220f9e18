"""Reading and writing HuggingFace checkpoint directories as numpy tensors.

A directory holds ``config.json`` and the weights as ``model.safetensors``, sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (possibly sharded with ``pytorch_model.bin.index.json``).
Reading needs ``torch`` and ``safetensors`` (the ``[hf]`` extra): bf16/fp16 tensors are
cast to fp32 numpy arrays. Writing needs only ``safetensors``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax.layout import KVLayout
from kvshare_jax.model import ModelConfig, Params

MODEL_TYPES = ("llama", "lckv-llama")
REFERENCE_SLIDING_WINDOW = 4096  # LCKVLlamaConfig's default window
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
_DEFAULT = ModelConfig(KVLayout((0,)))  # ModelConfig's defaults
_LAYER = "model.layers.{}."
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_config(hf_dir: str) -> dict[str, Any]:
    """The parsed ``config.json`` of ``hf_dir`` (``FileNotFoundError`` naming what is
    missing)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a HuggingFace model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def weight_files(hf_dir: str) -> list[str]:
    """Paths of the weight files of ``hf_dir`` (safetensors preferred over ``.bin``)."""
    for index, single in _WEIGHT_FILES:
        index_path = os.path.join(hf_dir, index)
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(hf_dir, n) for n in names]
        if os.path.exists(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise FileNotFoundError(
        f"no weights in {hf_dir}: expected model.safetensors, pytorch_model.bin "
        "or a sharded index json"
    )


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of ``hf_dir`` by HF name, as fp32 numpy arrays."""
    paths = weight_files(hf_dir)
    import torch

    out: dict[str, np.ndarray] = {}
    for path in paths:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        for name, t in tensors.items():
            out[name] = t.to(torch.float32).numpy()
    return out


def write_dir(out_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (contiguous fp32) to ``out_dir``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(arrays, os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})


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
        forward_passes=hf.get("forward_passes", _DEFAULT.forward_passes),
        backward_passes=hf.get("backward_passes", _DEFAULT.backward_passes),
        sliding_window=window,
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
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
    cfg = model_config_from_hf(read_config(hf_dir))
    return cfg, params_from_hf(cfg, read_tensors(hf_dir))
