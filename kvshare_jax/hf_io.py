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

import numpy as np

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
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
