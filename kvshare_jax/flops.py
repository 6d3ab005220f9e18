"""FLOPs a step executes, counted from the model, and the peaks of the devices that
run it (TPU chips from Google's published figures, NVIDIA GPUs from `gpu_topology`).

XLA's cost analysis counts the body of a loop once (measured: a 7-trip fori_loop or
scan of a matmul reports one matmul's FLOPs), and the train step loops over
micro-batches and over the no-gradient passes of cyclic blocks; so rooflines and MFU use
the executed FLOPs counted here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvshare_jax import gpu_topology
from kvshare_jax.model import ModelConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peaks of one JAX device of a TPU generation (a chip; a TensorCore on v2-v4, whose
    compile-only topologies list one device per core)."""

    name: str
    bf16_flops: float  # peak bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int  # usable HBM per device (what the TPU compiler reports as available)


# Public peak figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm, per chip,
# halved per core on v2-v4); usable HBM measured with libtpu's compiler on this host.
CHIPS = {
    "TPU v2": Chip("v2", 22.5e12, 350e9, int(7.48 * GIB)),
    "TPU v3": Chip("v3", 61.5e12, 450e9, int(15.48 * GIB)),
    "TPU v4": Chip("v4", 137.5e12, 614e9, int(15.25 * GIB)),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, int(15.75 * GIB)),
    "TPU v5": Chip("v5p", 459e12, 2765e9, int(95.74 * GIB)),
    "TPU v6 lite": Chip("v6e", 918e12, 1640e9, int(31.25 * GIB)),
}
GENERATIONS = {chip.name: kind for kind, chip in CHIPS.items()}


def chip_of(device: Any) -> Chip:
    """The :class:`Chip` of a TPU device or of a compile-only GPU (:mod:`gpu_topology`);
    ``ValueError`` for other devices."""
    if device.platform in ("gpu", "cuda"):
        kind = gpu_topology.gpu_kind_of(device)
        return Chip(kind.name, kind.peak_bf16_flops, kind.hbm_bandwidth, kind.memory_bytes)
    try:
        return CHIPS[device.device_kind]
    except KeyError:
        raise ValueError(f"no peak figures for device kind {device.device_kind!r}") from None


def peak_flops(device: Any) -> float | None:
    """Peak bf16 FLOP/s of one ``device`` (a TPU chip or a known NVIDIA GPU); None for
    a CPU or an unknown kind (no MFU then)."""
    try:
        return chip_of(device).bf16_flops
    except ValueError:
        return None


# ---------------------------------------------------------------- FLOP counts
def _layer_flops(cfg: ModelConfig, i: int, keys: float) -> float:
    """Forward matmul FLOPs of layer ``i`` for one token that attends to ``keys`` keys."""
    q_dim, kv_dim = cfg.num_heads * cfg.hd, cfg.num_kv_heads * cfg.hd
    proj = q_dim + q_dim + (2 * kv_dim if cfg.layout.is_kv_layer(i) else 0)
    if cfg.layout.sliding[i] and cfg.sliding_window:
        keys = min(keys, cfg.sliding_window)
    return 2 * cfg.d_model * (proj + 3 * cfg.d_ff) + 4 * q_dim * keys


def _passes(cfg: ModelConfig, passes: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Per layer: forward evaluations, and how many of them carry a gradient."""
    runs, grads = [1] * cfg.num_layers, [1] * cfg.num_layers
    for block in cfg.layout.cyclic_blocks:
        for i in block.layers:
            runs[i], grads[i] = sum(passes), passes[1]
    return runs, grads


def executed_train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs one train step executes: forward (cyclic blocks m + b times), backward
    (twice the forward of what carries a gradient) and remat's extra forward."""
    keys = (seq_len + 1) / 2  # causal: the mean number of visible keys
    runs, grads = _passes(cfg, (cfg.forward_passes, cfg.backward_passes))
    head = 2 * cfg.d_model * cfg.vocab_size
    per_token = 3 * head
    for i in range(cfg.num_layers):
        layer = _layer_flops(cfg, i, keys)
        per_token += layer * (runs[i] + (2 + int(cfg.remat)) * grads[i])
    return float(batch * seq_len * per_token)


def loop_once_train_flops(cfg: ModelConfig, batch: int, seq_len: int, grad_accum: int = 1) -> float:
    """:func:`executed_train_flops` as XLA's cost analysis counts them: each loop body
    once, i.e. one micro-batch and at most one of the ``m`` no-gradient passes (a
    ``fori_loop``). The compiled train step's FLOPs over this is the ratio that shows
    work the model count does not (e.g. masked attention pairs computed anyway)."""
    m = min(cfg.forward_passes, 1)
    once = dataclasses.replace(cfg, forward_passes=m)
    return executed_train_flops(once, batch // grad_accum, seq_len)


def model_train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Model FLOPs of a train step: a standard transformer's forward + backward, each
    layer once (the MFU numerator: no iteration, no recomputation)."""
    keys = (seq_len + 1) / 2
    per_token = 3 * 2 * cfg.d_model * cfg.vocab_size
    per_token += sum(3 * _layer_flops(cfg, i, keys) for i in range(cfg.num_layers))
    return float(batch * seq_len * per_token)


def executed_generate_flops(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int) -> float:
    """Matmul FLOPs of a generation: prefill (cyclic blocks m + b times) and
    ``gen_len - 1`` decode steps over the cache buffer."""
    runs, _ = _passes(cfg, (cfg.forward_passes, cfg.backward_passes))
    head = 2 * cfg.d_model * cfg.vocab_size
    cache = prompt_len + gen_len - 1
    prefill = (
        head
        + sum(_layer_flops(cfg, i, cache) * runs[i] for i in range(cfg.num_layers)) * prompt_len
    )
    decode = (gen_len - 1) * (
        head + sum(_layer_flops(cfg, i, cache) for i in range(cfg.num_layers))
    )
    return float(batch * (prefill + decode))
