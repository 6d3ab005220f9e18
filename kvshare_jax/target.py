"""Which platform a program is built for: the target, never the host.

A CPU host can build TPU and GPU programs (AOT compilation for a topology, lowering for
CUDA), so kernels and ``attention_impl="auto"`` ask here instead of calling
``jax.default_backend()``. Order: an explicit argument, then the devices of the mesh the
program is traced under (``jax.set_mesh``), then the default backend.
"""

from __future__ import annotations

import glob
import os
from typing import Literal

import jax
from jax.sharding import AbstractMesh, Mesh

Platform = Literal["cpu", "gpu", "tpu"]
_ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def normalize(platform: str) -> Platform:
    """``cuda``/``rocm`` -> ``gpu``; raises ``ValueError`` for unknown names."""
    try:
        return _ALIASES[platform.lower()]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(
            f"unknown platform {platform!r}: expected cpu, gpu (cuda, rocm) or tpu"
        ) from None


def mesh_device(mesh: Mesh | AbstractMesh | None = None) -> tuple[str, str] | None:
    """``(platform, device_kind)`` of ``mesh`` (default: the ambient one), or None when
    it names no devices (an empty or purely abstract mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if isinstance(mesh, Mesh):
        if mesh.empty:
            return None
        dev = mesh.devices.flat[0]
        return dev.platform, dev.device_kind
    if mesh.empty or mesh.abstract_device is None:
        return None
    dev = mesh.abstract_device
    return dev.platform, dev.device_kind


def target_platform(
    platform: str | None = None, mesh: Mesh | AbstractMesh | None = None
) -> Platform:
    """The platform to build for: ``platform`` if given, else the mesh's, else the
    default backend's."""
    if platform is not None:
        return normalize(platform)
    found = mesh_device(mesh)
    return normalize(found[0] if found else jax.default_backend())


# XLA:TPU starts rematerializing (recomputing) instructions once a program passes a share
# of HBM below all of it: near the max batch a decode step then recomputes its scores from
# K, reading every K slot two or three times (llama_110m standard at batch 856 on v5e:
# 1.49x the in-place floor). Inference programs (prefill, decode, generation) are compiled
# to use the whole HBM first, so a program either fits as written or does not compile.
_TPU_INFERENCE = {"xla_jf_rematerialization_percent_shared_memory_limit": "100"}


def inference_compiler_options(platform: str | None = None) -> dict[str, str]:
    """Compiler options of the inference programs for the target ``platform``
    (`target_platform`): on TPU, rematerialization only past the whole HBM."""
    return dict(_TPU_INFERENCE) if target_platform(platform) == "tpu" else {}


def target_device_kind(mesh: Mesh | AbstractMesh | None = None) -> str:
    """``device_kind`` of the mesh's devices (e.g. ``"TPU v5 lite"``), else of the first
    default device."""
    found = mesh_device(mesh)
    return found[1] if found else jax.devices()[0].device_kind


def compile_only_libtpu() -> None:
    """Settings for libtpu on a host that is not a TPU VM (no ``/dev/accel*`` or
    ``/dev/vfio``) or that runs JAX on CPU, where libtpu only compiles for compile-only
    topologies: let several processes load it (it takes a host-wide lock otherwise, so
    pytest workers would fail), and tell it what its host probe would look up, so that
    it prints no warnings. Call before JAX starts a backend."""
    on_cpu = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if not on_cpu and (glob.glob("/dev/accel*") or os.path.exists("/dev/vfio")):
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
