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

import dataclasses
import functools
import math

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from kvshare_jax.kernels.flash import flash_attention, flash_cache_attention
from kvshare_jax.masks import Mask
from kvshare_jax.target import target_device_kind, target_platform

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    platform: str | None = None,
    device_kind: str | None = None,
    **options,
) -> jax.Array:
    """Flash attention ``q [b,t,n,h]``, ``k, v [b,s,kh,h]`` under ``mask``
    (:class:`~kvshare_jax.masks.Mask`) -> ``[b,t,n,h]``, same semantics as
    ``xla_attention``; ``options`` (``block_q``, ``block_k``, ``interpret``) and the
    other arguments as in ``flash_attention``.

    ``mesh=None`` uses the ambient mesh (``jax.set_mesh``); with no mesh, or a mesh
    without any non-manual 'data'/'fsdp'/'tensor' axis (e.g. already inside a
    ``shard_map`` over them), the kernel is called directly. Axes missing from the
    mesh are simply not used. ``platform=None`` targets the mesh's devices (else the
    default backend), ``device_kind=None`` their kind. Raises ``ValueError`` if the batch
    is not divisible by the product of the batch axes or the query/KV heads by the
    'tensor' size.
    """
    plan = _plan(mesh, platform, device_kind)
    kernel = functools.partial(flash_attention, **plan.options, **options)
    return plan.run(kernel, (q, k, v, mask), kv_heads=k.shape[2], slots=False)


def pallas_cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    layout: str,
    scales: tuple[jax.Array, jax.Array] | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    platform: str | None = None,
    device_kind: str | None = None,
    **options,
) -> jax.Array:
    """Attention of ``q [b,t,n,h]`` over decode-cache slots ``k, v`` (rows ``[b*kh,S,h]``
    for ``layout="SH"``, ``[b*kh,h,S]`` for ``"HS"``; quantized with ``scales``, rows
    ``[b*kh,S]``, if given) -> ``[b,t,n,h]``, per shard like :func:`pallas_attention`
    (the slot rows split as sequences over the batch axes and KV heads over 'tensor');
    see :func:`~kvshare_jax.kernels.flash.flash_cache_attention`."""
    plan = _plan(mesh, platform, device_kind)
    b = q.shape[0]
    k, v = (x.reshape(b, -1, *x.shape[1:]) for x in (k, v))  # [b, kh, ., .]: a bitcast
    if scales is not None:
        scales = tuple(x.reshape(b, -1, x.shape[-1]) for x in scales)  # [b, kh, S]
    options = {**plan.options, **options}

    def kernel(q, k, v, mask, scales):
        return flash_cache_attention(q, k, v, mask, layout=layout, scales=scales, **options)

    return plan.run(kernel, (q, k, v, mask, scales), kv_heads=k.shape[1], slots=True)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How attention is split over a mesh: its free batch axes and head axis."""

    mesh: Mesh | AbstractMesh
    platform: str
    device_kind: str | None
    batch: tuple[str, ...]
    head: str | None

    @property
    def options(self) -> dict[str, str | None]:
        """The kernel's target: the mesh's platform and device kind."""
        return {"platform": self.platform, "device_kind": self.device_kind}

    @property
    def direct(self) -> bool:
        """No free mesh axis: call the kernel as it is."""
        return not self.batch and self.head is None

    def run(self, kernel, args: tuple, kv_heads: int, slots: bool) -> jax.Array:
        """``kernel(q, k, v, mask[, scales])`` called directly, or per shard (K/V
        time-major ``[b, s, kh, h]``, or per-batch-row cache slots ``[b, kh, ., .]`` with
        ``slots``, their scales ``[b, kh, S]``; every array of the mask split over the
        batch axes)."""
        if self.direct:
            return kernel(*args)
        q = args[0]
        self.check(q.shape[0], q.shape[2], kv_heads)
        heads = P(self.batch or None, None, self.head, None)
        kv = P(self.batch or None, self.head, None, None) if slots else heads
        rows = P(self.batch or None, None)
        scales = P(self.batch or None, self.head, None)
        return jax.shard_map(
            kernel,
            mesh=self.mesh,
            in_specs=(heads, kv, kv, jax.tree.map(lambda _: rows, args[3]))
            + tuple(jax.tree.map(lambda _: scales, a) for a in args[4:]),
            out_specs=heads,
            check_vma=False,
        )(*args)

    def check(self, b: int, n: int, kh: int) -> None:
        batch_shards = math.prod(self.mesh.shape[a] for a in self.batch)
        head_shards = self.mesh.shape[self.head] if self.head else 1
        if b % batch_shards or n % head_shards or kh % head_shards:
            raise ValueError(
                f"cannot shard attention: batch {b} over {self.batch} (size {batch_shards}), "
                f"query heads {n} / KV heads {kh} over {self.head!r} (size {head_shards})"
            )


def _plan(mesh, platform: str | None, device_kind: str | None) -> _Plan:
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    platform = target_platform(platform, mesh)
    if device_kind is None and platform == "tpu":
        device_kind = target_device_kind(mesh)
    free = {
        a
        for a, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind != AxisType.Manual
    }
    batch = tuple(a for a in BATCH_AXES if a in free)
    return _Plan(mesh, platform, device_kind, batch, HEAD_AXIS if HEAD_AXIS in free else None)
