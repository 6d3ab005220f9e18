"""Position-based attention masks shared by the XLA reference and the Pallas kernels.

Shapes: b batch, t query length, s key length. See docs/design.md §2 (masks).

A query at position ``p`` may see a key at position ``q`` iff ``q <= p`` (``q < p`` when
``strict``, used for upward targets) and, with a window ``W``, ``q > p - W``. Keys that
are padding or not yet written carry position ``INVALID_POS`` and are never seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INVALID_POS = int(jnp.iinfo(jnp.int32).max)  # position of a key that no query sees


def visible(qp: jax.Array, kp: jax.Array, *, strict: bool, window: int | None) -> jax.Array:
    """Boolean visibility of keys at ``kp`` from queries at ``qp`` (broadcasting)."""
    vis = kp < qp if strict else kp <= qp
    if window is not None:
        vis &= kp > qp - window
    return vis & (kp != INVALID_POS)


def attention_mask(
    q_pos: jax.Array, kv_pos: jax.Array, *, strict: bool, window: int | None
) -> jax.Array:
    """Boolean mask ``[b, t, s]`` from positions ``q_pos [b, t]`` and ``kv_pos [b, s]``."""
    return visible(q_pos[:, :, None], kv_pos[:, None, :], strict=strict, window=window)
