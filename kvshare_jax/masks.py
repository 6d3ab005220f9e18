"""Position- and segment-based attention masks: ONE mask value that the XLA reference,
the Pallas kernels (Triton, Mosaic), the sharded wrapper and the decoder all consume.

Shapes: b batch, t query length, s key length. See docs/design.md §2 (masks).

A :class:`Mask` holds the query and key positions, optional segment (document) ids of
queries and keys, and the static rule of a layer (``strict``, ``window``). A query at
position ``p`` (segment ``a``) may see a key at position ``q`` (segment ``c``) iff

- ``q <= p`` (``q < p`` when ``strict``, used for upward targets) and, with a window
  ``W``, ``q > p - W``;
- ``c == a`` when segment ids are given (packed rows: attention never crosses a
  document boundary; positions restart at 0 in every document);
- ``q != INVALID_POS`` (padding, unwritten cache slots).

Without segment ids (``q_seg = kv_seg = None``, "concat" packing, a single prompt) the
mask is the position rule alone and every consumer builds exactly the program it built
before segments existed: no segment inputs, no segment arithmetic.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

INVALID_POS = int(jnp.iinfo(jnp.int32).max)  # position of a key that no query sees


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of a mask (hashable: kernel configs and jit keys hold it)."""

    strict: bool = False  # q < p (upward targets) instead of q <= p
    window: int | None = None  # sliding window W: also q > p - W
    segments: bool = False  # segment ids are given: also equal segments


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """Who sees whom: positions (and segment ids) of queries and keys plus the static rule.

    A pytree: the arrays are its leaves (``None`` segments are no leaves at all), ``strict``
    and ``window`` are static, so it passes through ``jit``, ``shard_map``,
    ``jax.checkpoint`` and loops as one value.
    """

    q_pos: jax.Array  # [b, t] int
    kv_pos: jax.Array  # [b, s] int; INVALID_POS: never seen
    q_seg: jax.Array | None = None  # [b, t] int segment (document) ids, or None
    kv_seg: jax.Array | None = None  # [b, s] int, or None (both or neither)
    strict: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if (self.q_seg is None) != (self.kv_seg is None):
            raise ValueError("segment ids need both q_seg and kv_seg (or neither)")
        w = self.window
        if w is not None and (not isinstance(w, numbers.Integral) or isinstance(w, bool) or w < 1):
            raise ValueError(f"window must be a positive int or None, got {w!r}")

    @property
    def spec(self) -> MaskSpec:
        return MaskSpec(bool(self.strict), self.window, self.q_seg is not None)

    @property
    def segmented(self) -> bool:
        return self.q_seg is not None

    def rule(self, *, strict: bool, window: int | None) -> Mask:
        """The same positions and segments under a layer's rule."""
        window = None if window is None else int(window)
        return dataclasses.replace(self, strict=bool(strict), window=window)

    def replace(self, **changes) -> Mask:
        return dataclasses.replace(self, **changes)

    def dense(self) -> jax.Array:
        """Boolean mask ``[b, t, s]``."""
        qs = None if self.q_seg is None else self.q_seg[:, :, None]
        ks = None if self.kv_seg is None else self.kv_seg[:, None, :]
        return visible(self.q_pos[:, :, None], self.kv_pos[:, None, :], self.spec, qs, ks)


def visible(qp, kp, spec: MaskSpec, qs=None, ks=None) -> jax.Array:
    """Boolean visibility of keys at ``kp`` (segments ``ks``) from queries at ``qp``
    (segments ``qs``), broadcasting; the predicate of every implementation."""
    vis = kp < qp if spec.strict else kp <= qp
    if spec.window is not None:
        vis &= kp > qp - spec.window
    if qs is not None:
        vis &= qs == ks
    return vis & (kp != INVALID_POS)


def segment_positions(segments: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along the last axis
    (``[b, t]`` int32): the RoPE and mask positions of packed documents."""
    t = segments.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segments.shape)
    prev = jnp.concatenate([segments[..., :1], segments[..., :-1]], axis=-1)
    start = jnp.where((idx == 0) | (segments != prev), idx, 0)
    return idx - jax.lax.cummax(start, axis=segments.ndim - 1)


def attention_mask(mask: Mask) -> jax.Array:
    """Boolean mask ``[b, t, s]`` of ``mask`` (= ``mask.dense()``)."""
    return mask.dense()
