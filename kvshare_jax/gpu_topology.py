"""Compile-only NVIDIA GPU devices: build GPU programs on a host without GPUs.

``gpu_devices("h100:8")`` returns the devices of a one-host topology of 8 H100s from
``jax.experimental.topologies``; ``jax.jit(...).lower(...).compile()`` on them runs the real
XLA GPU compiler (and Triton for Pallas kernels) against a target description, so
``memory_analysis()`` and the compiled text are those of the target (``cost_analysis()``
returns None on these devices). Needs the CUDA plugin (``pip install 'kvshare_jax[cuda]'``)
but no GPU or driver; works with ``JAX_PLATFORMS=cpu``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

_PLUGIN_MODULE = "jax_plugins.xla_cuda12"  # installed by jax[cuda12] (jax-cuda12-plugin)
_MAX_GPUS = 8  # one host
_NAME = re.compile(r"(?P<kind>[a-z0-9]+):(?P<count>[0-9]+)")


@dataclass(frozen=True)
class GpuKind:
    """One GPU model: its XLA target description and the peaks a roofline needs."""

    name: str  # also device.device_kind of its compile-only devices
    target_config: str  # GpuTargetConfigProto, text format
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int


# The target configs below are written from published specs (Hopper: compute capability
# 9.0, 132 SMs, 228 KiB shared memory per SM, 50 MiB L2), not copied from a real device.
# To copy a real one, on a GPU machine run
#   jax._src.lib.xla_client.get_topology_for_devices(jax.devices()).target_config
# and paste its text here.
def _hopper_config(description: str, memory_bytes: int, bandwidth: float) -> str:
    return f"""\
gpu_device_info {{
  cuda_compute_capability {{ major: 9 minor: 0 }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{description}"
"""


def _hopper(description: str, memory_bytes: int, bandwidth: float) -> GpuKind:
    return GpuKind(
        name=description,
        target_config=_hopper_config(description, memory_bytes, bandwidth),
        peak_bf16_flops=989e12,  # SXM, dense
        hbm_bandwidth=bandwidth,
        memory_bytes=memory_bytes,
    )


GPU_KINDS: dict[str, GpuKind] = {
    "h100": _hopper("NVIDIA H100 80GB HBM3", 80 * 2**30, 3.35e12),
    "h200": _hopper("NVIDIA H200", 150754820096, 4.8e12),  # 141 GB as the driver reports it
}


def _parse(name: str) -> tuple[str, int] | None:
    match = _NAME.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if match is None or match["kind"] not in GPU_KINDS:
        return None
    count = int(match["count"])
    return (match["kind"], count) if 1 <= count <= _MAX_GPUS else None


def is_gpu_topology(name: str) -> bool:
    """Whether ``name`` is a GPU topology: ``h100:N`` or ``h200:N``, ``N`` GPUs (1..8)
    on one host."""
    return _parse(name) is not None


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (the ``[cuda]`` extra) is importable."""
    try:
        return importlib.util.find_spec(_PLUGIN_MODULE) is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


@functools.cache  # lru_cache(maxsize=None)
def gpu_devices(name: str) -> tuple[Any, ...]:
    """The compile-only devices of GPU topology ``name`` (e.g. ``"h200:8"``).

    Raises ``ValueError`` for a name :func:`is_gpu_topology` rejects, or when the CUDA
    plugin is not installed.
    """
    parsed = _parse(name)
    if parsed is None:
        kinds = " or ".join(f"{k}:N" for k in GPU_KINDS)
        raise ValueError(f"bad GPU topology {name!r}: expected {kinds} with N in 1..{_MAX_GPUS}")
    if not cuda_plugin_installed():
        raise ValueError(
            f"GPU topology {name!r} needs the CUDA plugin ({_PLUGIN_MODULE}): "
            "pip install 'kvshare_jax[cuda]'"
        )
    from jax.experimental import topologies

    kind, count = parsed
    topo = topologies.get_topology_desc(
        platform="cuda",
        topology=f"1x1x{count}",
        target_config=GPU_KINDS[kind].target_config,
    )
    return tuple(topo.devices)


def gpu_kind_of(device: Any) -> GpuKind:
    """The :class:`GpuKind` whose name is ``device.device_kind``; ``ValueError`` if none."""
    device_kind = getattr(device, "device_kind", None)
    for kind in GPU_KINDS.values():
        if kind.name == device_kind:
            return kind
    known = ", ".join(repr(k.name) for k in GPU_KINDS.values())
    raise ValueError(f"unknown GPU device kind {device_kind!r}: expected one of {known}")
