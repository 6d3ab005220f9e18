"""How one slot of the decode cache is laid out, per target (docs/design.md §5).

Shapes: b batch, k KV heads, S cache length, h head dim, t positions written at once.
A slot holds the K (or the V) of one KV layer for every sequence and KV head as rows
``B = b * k`` (sequence ``i``'s KV head ``j`` is row ``i * k + j``):

- ``"SH"``: ``[B, S, h]``, head dim minor. CPU and GPU: XLA:CPU's dots and the Triton
  kernel (head-major ``[b, k, S, h]``, a free reshape) read it as stored.
- ``"HS"``: ``[B, h, S]``, time minor. TPU: the time axis lies on the 128 lanes, so the
  slot is lane-dense for any head dim. ``[B, S, 64]`` would fill half of every vreg
  (XLA then relayouts the slot around each step, and a Mosaic kernel needs the
  row-major layout it cannot have); ``[B, h, S]`` is the layout XLA and Mosaic both read
  in place, for h = 64 and 128 alike.

Every sequence writes a decode step's K/V at the same cache index (one in-place
``dynamic_update_slice`` per slot, never a scatter); the position each index holds is
kept per sequence beside the slots (``KVCache.kv_pos``), and the masks work on those
positions, so ragged prompts cost nothing but their padding indices.

A quantized cache (:mod:`kvshare_jax.kv_quant`) keeps one fp32 scale per row and index
beside each slot, ``[B, S]`` in both layouts (time minor: lane-dense on TPU, one row per
KV head for the kernels), written in place like the slot.
"""

from __future__ import annotations

from typing import Any, Literal

import jax

from kvshare_jax.target import target_platform

SlotLayout = Literal["SH", "HS"]
LAYOUTS: tuple[SlotLayout, ...] = ("SH", "HS")
TIME_ALIGN = 128  # cache length multiple on accelerators: whole lane tiles / key blocks


def for_target(platform: str | None = None) -> SlotLayout:
    """The slot layout of a program built for ``platform`` (None: the target, see
    :mod:`kvshare_jax.target`): ``"HS"`` on TPU, ``"SH"`` elsewhere."""
    return "HS" if target_platform(platform) == "tpu" else "SH"


def cache_length(length: int, platform: str | None = None) -> int:
    """Cache positions to allocate for ``length``: rounded up to a multiple of 128 on TPU
    and GPU (key tiles then divide the cache: no padding copy per step), exact on CPU
    (where every allocated position costs attention work)."""
    if target_platform(platform) == "cpu":
        return length
    return -(-length // TIME_ALIGN) * TIME_ALIGN


def check(layout: str) -> SlotLayout:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cache slot layout {layout!r}: expected SH or HS")
    return layout  # type: ignore[return-value]


def slot_shape(layout: SlotLayout, rows: int, length: int, h: int) -> tuple[int, int, int]:
    """``[B, S, h]`` (SH) or ``[B, h, S]`` (HS)."""
    return (rows, length, h) if check(layout) == "SH" else (rows, h, length)


def to_slot(layout: SlotLayout, new: jax.Array) -> jax.Array:
    """Time-major KVs ``[b, t, k, h]`` as slot rows (``[b*k, t, h]`` or ``[b*k, h, t]``)."""
    b, t, k, h = new.shape
    if check(layout) == "SH":
        return new.transpose(0, 2, 1, 3).reshape(b * k, t, h)
    return new.transpose(0, 2, 3, 1).reshape(b * k, h, t)


def write(
    layout: SlotLayout, buf: jax.Array, new: jax.Array, index: jax.Array | int, row: Any = 0
) -> jax.Array:
    """Writes time-major KVs ``new [c, t, k, h]`` at cache indices ``index .. index+t-1``
    of ``buf``, into its rows from ``row`` on (sequences ``row // k ..``), in place (one
    ``dynamic_update_slice``)."""
    rows = to_slot(layout, new).astype(buf.dtype)
    start = (row, index, 0) if layout == "SH" else (row, 0, index)
    return jax.lax.dynamic_update_slice(buf, rows, start)


def write_scale(
    buf: jax.Array, scale: jax.Array, index: jax.Array | int, row: Any = 0
) -> jax.Array:
    """Writes the time-major scales ``scale [c, t, k]`` of quantized KVs at cache indices
    ``index .. index+t-1`` of a scale slot ``buf [B, S]`` (the rows of the K/V slot, time
    minor in every layout), from row ``row`` on, in place."""
    c, t, k = scale.shape
    rows = scale.transpose(0, 2, 1).reshape(c * k, t).astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, rows, (row, index))
