"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

Mesh axes are ``('data', 'fsdp', 'tensor')``. Params and activations carry logical axis
names (``'batch'``, ``'embed'``, ``'heads'``...); ``config.mesh.rules`` maps them to mesh
axes, so one model definition runs data-parallel, FSDP or tensor-parallel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kvshare_jax.model import ModelConfig, param_logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("batch", "length")  # logical axes of a [b, T] token batch
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def init_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    auto: bool = False,
) -> bool:
    """Joins a multi-process job if asked to; returns whether it did.

    Asked means a coordinator address (argument or ``JAX_COORDINATOR_ADDRESS``) or
    ``auto``. Missing counts come from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, else
    JAX detects them (TPU pods, SLURM...). Must run before anything touches a backend.
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not (address or auto):
        return False
    count = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
    index = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
    jax.distributed.initialize(
        address, num_processes=count, process_id=index if index >= 0 else None
    )
    return True


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves ``(data, fsdp, tensor)``; one size may be -1 (= the remaining devices)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {described}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {described} cannot fill {num_devices} devices: "
                f"{num_devices} is not a multiple of {fixed}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {described} has {fixed} devices but {num_devices} are available; "
            "the sizes must multiply to the device count (use -1 for one axis to fill)"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except AssertionError:  # no physical-layout rule (e.g. one device per TPU v4 core)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> Rules:
    """``config.mesh.rules`` as a tuple of ``(logical, mesh axes)`` (JSON lists accepted)."""
    rules = []
    for logical, mesh_axes in mesh_cfg.rules:
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        for axis in mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"rule for {logical!r} names unknown mesh axis {axis!r}")
        rules.append((str(logical), mesh_axes))
    return tuple(rules)


def to_shardings(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` of every parameter, from the model's logical axes."""
    return to_shardings(param_logical_axes(cfg), mesh, rules)


def opt_state_shardings(
    tx: optax.GradientTransformation, abstract_opt_state: Any, params_sharding: Any, mesh: Mesh
) -> Any:
    """Optimizer-state shardings: param-shaped subtrees follow the params, the rest
    (counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def check_shardable(abstract: Any) -> None:
    """Raises a ``ValueError`` naming the first array (``ShapeDtypeStruct`` with a
    ``NamedSharding``) whose dimension is not divisible by its mesh axes."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        mesh, spec = leaf.sharding.mesh, leaf.sharding.spec
        for dim, axes in enumerate(spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(mesh.shape[a] for a in axes)
            if leaf.shape[dim] % ways:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
                    f"{ways} ways along dimension {dim} (mesh axes {axes}); pick model "
                    "sizes (vocab, d_model, heads, d_ff) divisible by the mesh axes"
                )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a ``[b, T]`` batch: ``b`` over the data axes, ``T`` replicated."""
    spec = nn.logical_to_mesh_axes(BATCH_AXES, rules)
    return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (``data * fsdp`` with default rules)."""
    axes = batch_sharding(mesh, rules).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: Rules, what: str = "batch") -> None:
    """Raises a clear ``ValueError`` unless ``batch_size`` splits evenly over the
    data-parallel devices and the processes."""
    ways = data_parallel_size(mesh, rules)
    if batch_size % ways:
        shape = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
        raise ValueError(
            f"{what} size {batch_size} is not divisible by the data-parallel size {ways} "
            f"(mesh {shape})"
        )
    processes = process_count(mesh)
    if batch_size % processes:
        raise ValueError(
            f"{what} size {batch_size} is not divisible by the process count {processes}"
        )


def process_count(mesh: Mesh) -> int:
    """How many processes (hosts) own the mesh's devices (this job's count for an
    abstract mesh, which names no devices)."""
    if not isinstance(mesh, Mesh):
        return jax.process_count()
    return len({d.process_index for d in mesh.devices.flat})
