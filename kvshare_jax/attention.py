"""Attention with the KV-sharing masks, and dispatch to the XLA or Pallas path.

Shapes: b batch, t query length, s key length, n query heads, k KV heads
(``n % k == 0``, GQA), h head dim. Keys and values come time-major ``[b,s,k,h]`` or, with
``cache`` set, as decode-cache slots in that layout (:mod:`kvshare_jax.cache_layout`):
rows ``[b*k,s,h]`` ("SH") or ``[b*k,h,s]`` ("HS"), sequence i's KV head j in row ``i*k + j``.
Quantized slots (int8 or fp8, :mod:`kvshare_jax.kv_quant`) come with ``scales = (k_scale,
v_scale)``, each ``[b*k, s]`` fp32: every path folds them into the scores and the
probabilities instead of dequantizing a copy of the cache.

Every path takes ONE mask value, :class:`kvshare_jax.masks.Mask`: absolute token
positions of queries and keys, optional segment (document) ids, and the layer's rule
(``strict``, ``window``), so one mechanism covers training, packed documents, prefill
with offsets, ragged batches and KV caches. A query at position ``p`` may see a key at
position ``q`` iff ``q <= p`` (``q < p`` when ``strict``, used for upward targets),
``q > p - W`` with a window ``W``, and both lie in the same segment when segment ids are
given. Keys that are padding or not yet written carry position ``INVALID_POS`` and are
never seen. A query row that sees no key outputs exactly zero (never a softmax over an
all-masked row).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from kvshare_jax.cache_layout import SlotLayout
from kvshare_jax.masks import INVALID_POS, Mask, attention_mask
from kvshare_jax.target import target_platform

__all__ = [
    "INVALID_POS",
    "Impl",
    "Mask",
    "attention",
    "attention_mask",
    "resolve_impl",
    "xla_attention",
]

Impl = Literal["xla", "pallas", "auto"]


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    cache: SlotLayout | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Reference attention: ``q [b,t,n,h]``, ``k, v [b,s,k,h]`` (or cache slots in the
    layout ``cache``, quantized with ``scales`` if given) under ``mask`` -> ``[b,t,n,h]``.

    Quantized slots are converted to the dtype of ``q`` as the dots read them (exact:
    int8 and e4m3 values are bf16 values) and their scales applied to what the dots
    give: ``scores = (q . k_q) * k_scale``, ``out = (p * v_scale) . v_q``.

    Softmax is computed in fp32; the output has the dtype of ``q``. A cache slot is
    contracted as stored, with no degenerate dimension: at batch 1 a ``[1,k,s,h]`` slot
    reached the dot through a bitcast, and XLA:CPU copied the whole slot around its
    in-place token write in every step (+13% decode speed at batch 1 without).
    """
    b, t, n, h = q.shape
    kh = k.shape[0] // b if cache else k.shape[2]
    if n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({kh})")
    g = n // kh
    s = k.shape[2] if cache == "HS" else k.shape[1]
    qg = q.reshape(b, t, kh, g, h)
    if scales is not None:
        if not cache:
            raise ValueError("scales are for quantized cache slots (cache=SH or HS)")
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    if cache:
        kv = "BhS" if cache == "HS" else "BSh"
        qr = jnp.swapaxes(qg, 1, 2).reshape(b * kh, t, g, h)
        scores = _dot(f"Btgh,{kv}->BgtS", qr, k)
        if scales is not None:
            scores = scores * scales[0][:, None, None, :]
        scores = scores.reshape(b, kh, g, t, s)
    else:
        scores = _dot("btkgh,bskh->bkgts", qg, k)
    scores = scores * (h**-0.5)
    mask = mask.dense()[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    if scales is not None:
        p = p * scales[1].reshape(b, kh, 1, 1, s)
    p = p.astype(v.dtype)
    if cache:
        out = _dot(f"BgtS,{kv}->Btgh", p.reshape(b * kh, g, t, s), v)
        out = jnp.swapaxes(out.reshape(b, kh, t, g, h), 1, 2)
    else:
        out = _dot("bkgts,bskh->btkgh", p, v)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` accumulated in fp32. XLA:CPU has no bf16 x bf16 -> f32 dot for some
    operand layouts (the decode cache's), so on CPU the operands are upcast first: the
    same result, as a product of two bf16 values is exact in fp32."""
    if target_platform() == "cpu" and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def resolve_impl(impl: Impl, platform: str | None = None) -> Literal["xla", "pallas"]:
    """``auto`` picks Pallas when the target (``platform``, else the ambient mesh's
    devices, else the default backend; see :mod:`kvshare_jax.target`) is a GPU or TPU,
    and the XLA reference on CPU."""
    if impl == "auto":
        return "pallas" if target_platform(platform) in ("gpu", "tpu") else "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown attention impl {impl!r}: expected xla, pallas or auto")
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    impl: Impl = "xla",
    cache: SlotLayout | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Masked multi-head attention dispatched to the chosen implementation (``cache``:
    ``k, v`` are decode-cache slots in that layout, read in place by both paths;
    ``scales``: they are quantized, with these per-row-and-index scales)."""
    if resolve_impl(impl) == "pallas":
        from kvshare_jax.kernels import pallas_attention, pallas_cache_attention

        if cache:
            return pallas_cache_attention(q, k, v, mask, layout=cache, scales=scales)
        if scales is not None:
            raise ValueError("scales are for quantized cache slots (cache=SH or HS)")
        return pallas_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask, cache=cache, scales=scales)
