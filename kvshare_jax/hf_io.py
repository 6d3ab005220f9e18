"""Reading and writing HuggingFace checkpoint directories as numpy tensors.

A directory holds ``config.json`` and the weights as ``model.safetensors``, sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (possibly sharded with ``pytorch_model.bin.index.json``).
Reading needs ``torch`` and ``safetensors`` (the ``[hf]`` extra): bf16/fp16 tensors are
cast to fp32 numpy arrays. Writing needs only ``safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax import progress
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
    return _read_json(path)


def _read_json(path: str) -> Any:
    """The parsed JSON file ``path``; ``ValueError`` naming it when it is not valid JSON,
    or (for ``config.json``) not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


def weight_files(hf_dir: str) -> list[str]:
    """Paths of the weight files of ``hf_dir`` (safetensors preferred over ``.bin``)."""
    for index, single in _WEIGHT_FILES:
        index_path = os.path.join(hf_dir, index)
        if os.path.exists(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(n, str) for n in weight_map.values()
            ):
                raise ValueError(f"{index_path} has no weight_map of tensor -> file names")
            paths = [os.path.join(hf_dir, n) for n in sorted(set(weight_map.values()))]
            for path in paths:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} (listed in {index_path}) not found")
            return paths
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
        tensors = _load_file(path)
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.numel() == 0):
                raise ValueError(f"{path}: entry {name!r} is not a floating-point tensor")
            out[name] = t.to(torch.float32).numpy()
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_file(path: str) -> dict[str, Any]:
    """The tensors of one weight file by name; ``ValueError`` naming the file when it is
    not a readable safetensors file, or not a ``torch.save`` of a name -> tensor dict that
    ``torch.load(weights_only=True)`` accepts (arbitrary pickles are refused)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - the library raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {_first_line(e)}") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:4] != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        reason = _first_line(e.__context__ or e).split(". Please use")[0]
        raise ValueError(f"{path} was refused by torch.load(weights_only=True): {reason}") from e
    if not isinstance(tensors, dict):
        raise ValueError(f"{path} holds a {type(tensors).__name__}, expected a state dict")
    return tensors


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
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"config.json: {key} must be an object or null, got {hf[key]!r}")
    params = hf.get("rope_parameters") or {}
    for scaling in (hf.get("rope_scaling"), params):
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind != "default":
            raise ValueError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is supported")
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    return _number(theta, "rope_theta")


def _number(value: Any, key: str) -> float:
    """``value`` as a positive finite float; ``ValueError`` naming the config key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _int(hf: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    """``hf[key]`` (``default`` when absent or null) as an int ``>= minimum``;
    ``ValueError`` naming the key for strings, floats, booleans and smaller values."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json lacks {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


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
    num_layers, d = _int(hf, "num_hidden_layers"), _int(hf, "hidden_size")
    n, f = _int(hf, "num_attention_heads"), _int(hf, "intermediate_size")
    kv_heads = _int(hf, "num_key_value_heads", n)
    if n % kv_heads:
        raise ValueError(
            f"config.json: num_attention_heads ({n}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    if hf.get("head_dim") is None and d % n:
        raise ValueError(
            f"config.json: hidden_size ({d}) must be a multiple of num_attention_heads ({n}) "
            "unless head_dim is set"
        )
    head_dim = _int(hf, "head_dim", d // n)
    window = 0
    layout = KVLayout(tuple(range(num_layers)))
    if model_type == "lckv-llama":
        layer_types = hf.get("layer_types")
        if layer_types is not None and not isinstance(layer_types, str):
            raise ValueError(
                f"config.json: layer_types must be a mapping string like '0_2_2_3', "
                f"got {layer_types!r}"
            )
        if layer_types:
            layout = KVLayout.parse(layer_types, num_layers)
        window = _int(hf, "sliding_window", 0, minimum=0)
        if any(layout.sliding) and window < 1:
            window = REFERENCE_SLIDING_WINDOW
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"config.json: tie_word_embeddings must be true or false, got {tie!r}")
    return ModelConfig(
        layout=layout,
        vocab_size=_int(hf, "vocab_size", 32000),
        d_model=d,
        num_heads=n,
        num_kv_heads=kv_heads,
        head_dim=0 if head_dim == d // n else head_dim,
        d_ff=f,
        max_len=_int(hf, "max_position_embeddings", 2048),
        forward_passes=_int(hf, "forward_passes", _DEFAULT.forward_passes, minimum=0),
        backward_passes=_int(hf, "backward_passes", _DEFAULT.backward_passes),
        sliding_window=window,
        rope_theta=_rope_theta(hf),
        norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=tie,
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
def tensor_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """``(path in our params tree, HF name, HF shape)`` of every tensor of ``cfg``, in
    checkpoint order; a path ending in ``kernel`` holds the transpose of the HF matrix.
    Non-KV layers have no ``k/v_proj``; a tied model has no ``lm_head``."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    qh, kvh = cfg.num_heads * cfg.hd, cfg.num_kv_heads * cfg.hd
    shapes = {"q_proj": (qh, d), "k_proj": (kvh, d), "v_proj": (kvh, d), "o_proj": (d, qh)}
    shapes |= {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    out = [(("embed", "embedding"), "model.embed_tokens.weight", (v, d))]
    for i in range(cfg.num_layers):
        p, layer = _LAYER.format(i), f"layer_{i}"
        out += [((layer, ours, "scale"), f"{p}{hf}.weight", (d,)) for ours, hf in _NORMS]
        for name in _ATTN:
            if name not in ("k_proj", "v_proj") or cfg.layout.is_kv_layer(i):
                out.append(((layer, name, "kernel"), f"{p}self_attn.{name}.weight", shapes[name]))
        out += [((layer, n, "kernel"), f"{p}mlp.{n}.weight", shapes[n]) for n in _MLP]
    out.append((("final_norm", "scale"), "model.norm.weight", (d,)))
    if not cfg.tie_embeddings:
        out.append((("lm_head", "kernel"), "lm_head.weight", (v, d)))
    return out


def check_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """``ValueError`` naming the first missing or misshaped tensor, or the unexpected
    ones, of ``tensors`` for ``cfg`` (before any conversion)."""
    wanted = tensor_map(cfg)
    for _, name, shape in wanted:
        if name not in tensors:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        if tensors[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {tensors[name].shape}, expected {shape}")
    known = {name for _, name, _ in wanted} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(k for k in tensors if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ValueError(f"unexpected tensors for this config: {', '.join(extra[:3])}{more}")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(
    cfg: ModelConfig, tensors: dict[str, np.ndarray], show_progress: bool = False
) -> Params:
    """Our params tree from HF tensors (checked first: ``ValueError`` on a missing,
    misshaped or unexpected tensor); ``show_progress``: a bar over the tensors."""
    check_tensors(cfg, tensors)
    wanted, tree = tensor_map(cfg), {}
    with progress.bar(wanted, desc="import", unit="tensor", disable=not show_progress) as bar:
        for path, name, _ in bar:
            value = jnp.asarray(tensors[name], jnp.float32)
            _set(tree, path, value.T if path[-1] == "kernel" else value)
    return {"params": tree}


def params_to_hf(
    cfg: ModelConfig, params: Params, show_progress: bool = False
) -> dict[str, np.ndarray]:
    """HF tensors (fp32 numpy) of our params tree, in checkpoint order; non-KV layers
    get no ``k/v_proj``; ``show_progress``: a bar over the tensors."""
    out, wanted = {}, tensor_map(cfg)
    with progress.bar(wanted, desc="export", unit="tensor", disable=not show_progress) as bar:
        for path, name, _ in bar:
            value = np.asarray(jax.device_get(_get(params["params"], path)), np.float32)
            out[name] = value.T if path[-1] == "kernel" else value
    return out


def read_hf(hf_dir: str, show_progress: bool = False) -> tuple[ModelConfig, Params]:
    """``(ModelConfig, params)`` of a HF ``llama``/``lckv-llama`` directory (fp32);
    ``show_progress``: a bar over the tensors converted."""
    cfg = model_config_from_hf(read_config(hf_dir))
    return cfg, params_from_hf(cfg, read_tensors(hf_dir), show_progress)
