"""Run the flash-attention kernel per shard under a ('data', 'fsdp', 'tensor') mesh.

Shapes: b batch, t query length, s key length, n query heads, kh KV heads, h head dim.
Batch is split over ('data', 'fsdp') and both query and KV heads over 'tensor' (a
contiguous split keeps each query head with its KV head). Pallas calls cannot be
partitioned by XLA, so the kernel runs inside ``jax.shard_map`` (``check_vma=False``).

The kernel is built for the mesh's platform (:func:`kvshare_jax.target.target_platform`):
under ``jax.set_mesh`` over TPU devices, even of a compile-only topology on a CPU host,
the Mosaic kernels are built, with the blocks of the devices' generation.
"""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from kvshare_jax.kernels.flash import flash_attention
from kvshare_jax.target import target_device_kind, target_platform

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    *,
    strict: bool = False,
    window: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> jax.Array:
    """Flash attention ``q [b,t,n,h]``, ``k, v [b,s,kh,h]`` -> ``[b,t,n,h]``, same
    semantics as ``xla_attention`` (see ``flash_attention`` for the other arguments).

    ``mesh=None`` uses the ambient mesh (``jax.set_mesh``); with no mesh, or a mesh
    without any non-manual 'data'/'fsdp'/'tensor' axis (e.g. already inside a
    ``shard_map`` over them), the kernel is called directly. Axes missing from the
    mesh are simply not used. ``platform=None`` targets the mesh's devices (else the
    default backend), ``device_kind=None`` their kind. Raises ``ValueError`` if the batch
    is not divisible by the product of the batch axes or the query/KV heads by the
    'tensor' size.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    platform = target_platform(platform, mesh)
    if device_kind is None and platform == "tpu":
        device_kind = target_device_kind(mesh)
    kwargs = dict(
        strict=strict,
        window=window,
        block_q=block_q,
        block_k=block_k,
        platform=platform,
        interpret=interpret,
        device_kind=device_kind,
    )
    free = {
        a
        for a, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind != AxisType.Manual
    }
    batch_axes = tuple(a for a in BATCH_AXES if a in free)
    head_axis = HEAD_AXIS if HEAD_AXIS in free else None
    if not batch_axes and head_axis is None:
        return flash_attention(q, k, v, q_pos, kv_pos, **kwargs)

    batch_shards = 1
    for a in batch_axes:
        batch_shards *= mesh.shape[a]
    head_shards = mesh.shape[head_axis] if head_axis else 1
    b, n, kh = q.shape[0], q.shape[2], k.shape[2]
    if b % batch_shards or n % head_shards or kh % head_shards:
        raise ValueError(
            f"cannot shard attention: batch {b} over {batch_axes} (size {batch_shards}), "
            f"query heads {n} / KV heads {kh} over {head_axis!r} (size {head_shards})"
        )

    def kernel(q, k, v, q_pos, kv_pos):
        return flash_attention(q, k, v, q_pos, kv_pos, **kwargs)

    heads = P(batch_axes or None, None, head_axis, None)
    pos = P(batch_axes or None, None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(heads, heads, heads, pos, pos),
        out_specs=heads,
        check_vma=False,
    )(q, k, v, q_pos, kv_pos)
