"""What the Triton/interpret kernels (``flash.py``) and the Mosaic kernels
(``flash_tpu.py``) share: the static kernel config, constants, and the tile tests of
the mask (docs/design.md §2).

Tile skipping: a (query tile, key tile) pair is computed only if :func:`may_overlap`
says some pair in it can be visible, from the tiles' position ranges (``[min, max]``
over queries; over the *valid* keys) and, with segment ids, their segment ranges. The
test is exact for any positions (it never skips a visible pair); it saves work when
positions are sorted within a document (training rows, decode caches) and skips tiles
that lie wholly in other documents. :func:`wholly_visible` is the converse: every pair
of the two tiles is visible (one document, all keys valid, inside the band).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvshare_jax.masks import INVALID_POS, MaskSpec

MASKED = -1e30  # finite "minus infinity": keeps exp/max free of inf - inf
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel parameters (hashable: a jit/custom_vjp static argument)."""

    scale: float  # softmax scale, h ** -0.5
    mask: MaskSpec  # strict, window, whether segment ids are inputs
    block_q: int  # (folded) query rows per tile
    block_k: int  # keys per tile
    platform: str  # "tpu" (Mosaic), "gpu" (Triton tiles) or "cpu" (interpret-mode tiles)
    interpret: bool
    quantized: bool = False  # decode over quantized cache slots: scales follow the mask

    @property
    def segments(self) -> bool:
        return self.mask.segments


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def kv_range(kp: jax.Array, axis=None):
    """``(min, max)`` over the valid positions of keys ``kp`` (``INVALID_POS`` excluded;
    ``(INVALID_POS, INT32_MIN)`` when none is valid)."""
    lo = jnp.min(kp, axis=axis)  # INVALID_POS is the int32 max, so it never wins the min
    hi = jnp.max(jnp.where(kp != INVALID_POS, kp, INT32_MIN), axis=axis)
    return lo, hi


def seg_range(kp: jax.Array, ks: jax.Array, axis=None):
    """``(min, max)`` of the segment ids ``ks`` of the valid keys (positions ``kp``)."""
    valid = kp != INVALID_POS
    lo = jnp.min(jnp.where(valid, ks, INT32_MAX), axis=axis)
    hi = jnp.max(jnp.where(valid, ks, INT32_MIN), axis=axis)
    return lo, hi


def may_overlap(q_lo, q_hi, kv_lo, kv_hi, spec: MaskSpec, segs=None):
    """False only if no (query, key) pair of two tiles with these position ranges (and,
    with ``segs = (qs_lo, qs_hi, ks_lo, ks_hi)``, segment ranges) is visible."""
    hit = kv_lo < q_hi if spec.strict else kv_lo <= q_hi
    if spec.window is not None:
        hit = jnp.logical_and(hit, kv_hi > q_lo - spec.window)
    if segs is not None:
        qs_lo, qs_hi, ks_lo, ks_hi = segs
        hit = jnp.logical_and(hit, jnp.logical_and(ks_lo <= qs_hi, ks_hi >= qs_lo))
    return hit


def wholly_visible(q_lo, q_hi, kv_lo, kv_hi, kv_all, spec: MaskSpec, segs=None):
    """True only if every (query, key) pair of the two tiles is visible (``kv_all``: every
    key of the tile is valid; ``segs``: both tiles lie in one and the same segment)."""
    full = kv_hi < q_lo if spec.strict else kv_hi <= q_lo
    full = jnp.logical_and(full, kv_all != 0)
    if spec.window is not None:
        full = jnp.logical_and(full, kv_lo > q_hi - spec.window)
    if segs is not None:
        qs_lo, qs_hi, ks_lo, ks_hi = segs
        one = jnp.logical_and(qs_lo == qs_hi, ks_lo == ks_hi)
        full = jnp.logical_and(full, jnp.logical_and(one, qs_lo == ks_lo))
    return full
