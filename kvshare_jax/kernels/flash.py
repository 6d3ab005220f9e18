"""Pallas flash attention with the KV-sharing masks (forward and backward): the entry
point, and the Triton (GPU) / CPU-interpret kernel. The mask is one
:class:`kvshare_jax.masks.Mask` (positions, optional segment ids, strict, window).

Shapes: b batch, t query length, s key length, n query heads, kh KV heads
(``n % kh == 0``, GQA group ``g = n // kh``), h head dim.

Semantics are those of :func:`kvshare_jax.attention.xla_attention`: a key at position
``kp`` is visible to a query at ``qp`` iff ``kp <= qp`` (``kp < qp`` when ``strict``),
``kp > qp - window`` when a window is set, the key's segment is the query's when the
mask has segment ids, and ``kp != INVALID_POS``. A row that sees no key outputs exactly 0
and gets zero gradients. Softmax statistics and all accumulation
are fp32; the output has the dtype of ``q``.

Which kernel runs is decided by the *target* platform, not the host
(:func:`kvshare_jax.target.target_platform`: an explicit ``platform``, else the devices
of the ambient mesh, else the default backend):

- ``"tpu"``: the Mosaic kernels of :mod:`kvshare_jax.kernels.flash_tpu` (key axis on the
  grid, VMEM scratch accumulators, per-generation blocks by ``device_kind``).
- ``"gpu"``: the Triton kernels below.
- ``"cpu"``: the kernels below in Pallas interpret mode.

``interpret=True`` runs the chosen variant in interpret mode on any host (the TPU one in
the TPU interpreter); ``interpret=False`` on a CPU target is an error.

Layout inside the Triton kernels (built by the wrapper, differentiated by JAX):

- GQA is folded into the query rows: for KV head ``j`` the kernel sees the ``g`` query
  heads of its group as one head of ``t * g`` rows (row ``r`` is token ``r // g``,
  group member ``r % g``, with position ``q_pos[r // g]``). K/V are never repeated, every
  K/V tile is loaded once per group, and dK/dV are summed over the group inside the
  kernel (they accumulate over all rows of the folded head).
- Head-major ``[b, kh, rows, h]``; positions (and segment ids, as two more inputs after
  them) as a column ``[b, rows, 1]`` (queries) and a row ``[b, 1, s]`` (keys) so a tile
  mask is a plain broadcast compare. Without segment ids the kernels have no such inputs.
- Query rows are padded to a multiple of ``block_q`` by repeating the last position (the
  padded rows get a zero cotangent, so they add nothing to dK/dV, and they do not widen
  the tile's position range); keys are padded to a multiple of ``block_k`` with
  ``INVALID_POS``; the head dim is zero-padded to the backend tile (see
  :func:`padded_head_dim`). Results are sliced back.

Grids: forward and dQ run one program per (batch, KV head, query tile) and loop over key
tiles; dK/dV run one program per (batch, KV head, key tile) and loop over query tiles.
A tile pair is skipped (``lax.cond``) when the position ranges of the two tiles cannot
overlap the mask (``min kv <= max q`` (``<`` if strict), with a window
``max valid kv > min q - window``, with segment ids intersecting segment ranges:
:func:`kvshare_jax.kernels.common.may_overlap`). This test is exact for any positions
(it never skips a visible pair); it only *saves* work when positions are sorted within a
document, as they are for training (``arange``, restarting per document) and for the
decoder's cache (``arange(max_len)`` with ``INVALID_POS`` for unwritten slots), and it
skips the tiles of other documents. Positions are expected to be non-negative
(``qp - window`` must not overflow int32).

Decode (``t = 1`` or small, long ``s``) uses the same kernels: the query tile is the
folded ``t * g`` rows rounded up to the backend minimum (8 rows; 16 on GPU), and the loop
runs over all key tiles, skipping the ones that are invalid or outside the window. There
is no split-KV (flash-decoding) parallelism. :func:`flash_cache_attention` feeds the
decode cache's slots to them head-major as stored (``[b, kh, S, h]``), with no transpose
and, when the cache length is a multiple of the key tile, no padding.

Verification: the Triton kernels run in interpret mode on CPU in the tests and are
lowered for CUDA (``lowering_platforms=("cuda",)``) on a CPU host; they have not been
compiled by Triton or run on a GPU here. Each program loops over the whole other
sequence, which is fine for Triton (pointer-based loads of one tile at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kvshare_jax.kernels.common import (
    MASKED,
    NN,
    NT,
    TN,
    Config,
    kv_range,
    may_overlap,
    round_up,
    seg_range,
)
from kvshare_jax.kernels.flash_tpu import cache_attention_tpu, flash_attention_tpu
from kvshare_jax.masks import INVALID_POS, Mask, visible
from kvshare_jax.target import target_device_kind, target_platform

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_DEFAULT_BLOCK = {"gpu": 128, "cpu": 32}


# ----------------------------------------------------------------------------- helpers


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def padded_head_dim(h: int, platform: str) -> int:
    """Head dim after zero padding in the Triton/interpret kernels: next power of two
    >= 16 on GPU (Triton tensors), a multiple of 8 on CPU (interpret mode). (The TPU
    kernels never pad it.)"""
    if platform == "gpu":
        return max(16, _next_pow2(h))
    return round_up(h, 8)


def block_size(requested: int | None, length: int, platform: str, axis: str) -> int:
    """Tile size of the Triton/interpret kernels along ``axis`` ("q" rows or "k" keys)
    for a sequence of ``length`` on ``platform`` ("gpu" or "cpu").

    Defaults: 128 on GPU, 32 on CPU. The tile is shrunk to the (aligned) length for short
    sequences. Raises ``ValueError`` for sizes the backend cannot use: GPU needs powers
    of two >= 16. (TPU tiles: :func:`kvshare_jax.kernels.flash_tpu.block_sizes`.)
    """
    block = _DEFAULT_BLOCK[platform] if requested is None else requested
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block_{axis} must be a positive int, got {block!r}")
    block = int(block)
    if platform == "gpu":
        if block < 16 or block & (block - 1):
            raise ValueError(f"block_{axis}={block}: GPU (Triton) needs a power of two >= 16")
        return min(block, max(16, _next_pow2(length)))
    return min(block, round_up(length, 8))


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


class _Side:
    """The mask inputs of one tile side: positions and (with segments) segment ids."""

    def __init__(self, pos, seg=None):
        self.pos, self.seg = pos, seg


def _visible(q: _Side, k: _Side, cfg: Config) -> jax.Array:
    """Tile mask ``[bq, bk]`` from query columns ``[bq, 1]`` and key rows ``[1, bk]``."""
    return visible(q.pos, k.pos, cfg.mask, q.seg, k.seg)


def _q_stats(q: _Side):
    """Position (and segment) range of a query tile."""
    segs = None if q.seg is None else (jnp.min(q.seg), jnp.max(q.seg))
    return (jnp.min(q.pos), jnp.max(q.pos)), segs


def _kv_stats(k: _Side):
    segs = None if k.seg is None else seg_range(k.pos, k.seg)
    return kv_range(k.pos), segs


def _hit(q_stats, kv_stats, cfg: Config) -> jax.Array:
    """False only if no pair of the two tiles is visible (common.may_overlap)."""
    (q_lo, q_hi), q_segs = q_stats
    (kv_lo, kv_hi), kv_segs = kv_stats
    segs = None if q_segs is None else (*q_segs, *kv_segs)
    return may_overlap(q_lo, q_hi, kv_lo, kv_hi, cfg.mask, segs)


def _probs(q, k, qs: _Side, ks: _Side, lse, cfg: Config) -> jax.Array:
    """Normalised probabilities ``[bq, bk]`` recomputed from the row log-sum-exp."""
    vis = _visible(qs, ks, cfg)
    s = jnp.where(vis, _dot(q, k, NT) * cfg.scale, MASKED)
    return jnp.where(vis, jnp.exp(s - lse), 0.0)


def _split(refs, cfg: Config):
    """``(q, k, v, q side, kv side, rest)`` of a kernel's refs (segment refs follow the
    position refs when the mask has segments)."""
    q_ref, k_ref, v_ref, qpos_ref, kvpos_ref = refs[:5]
    if cfg.segments:
        qseg_ref, kvseg_ref = refs[5:7]
        return q_ref, k_ref, v_ref, (qpos_ref, qseg_ref), (kvpos_ref, kvseg_ref), refs[7:]
    return q_ref, k_ref, v_ref, (qpos_ref, None), (kvpos_ref, None), refs[5:]


def _load(refs, idx=...) -> _Side:
    pos_ref, seg_ref = refs
    return _Side(pos_ref[idx], None if seg_ref is None else seg_ref[idx])


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, cfg: Config):
    """One query tile against all key tiles: online softmax, fp32 accumulators. Quantized
    K/V (``cfg.quantized``) come with scale rows ``[1, keys]`` after the mask refs:
    scores ``(q . k) * k_scale``, values ``(p * v_scale) . v``."""
    q_ref, k_ref, v_ref, q_refs, kv_refs, rest = _split(refs, cfg)
    scales, (o_ref, lse_ref) = (rest[:2], rest[2:]) if cfg.quantized else ((), rest)
    bq, hp = q_ref.shape
    bk = cfg.block_k
    q = q_ref[...]
    qs = _load(q_refs)
    q_stats = _q_stats(qs)

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        ks = _load(kv_refs, (slice(None), pl.ds(start, bk)))

        def update(carry):
            acc, m, denom = carry
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            vis = _visible(qs, ks, cfg)
            s = _dot(q, k.astype(q.dtype), NT) * cfg.scale
            if scales:
                s = s * scales[0][:, pl.ds(start, bk)]
            s = jnp.where(vis, s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m - m_new)
            denom_new = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
            pv = p * scales[1][:, pl.ds(start, bk)] if scales else p
            acc_new = alpha * acc + _dot(pv.astype(q.dtype), v.astype(q.dtype), NN)
            return acc_new, m_new, denom_new

        return lax.cond(_hit(q_stats, _kv_stats(ks), cfg), update, lambda c: c, carry)

    init = (
        jnp.zeros((bq, hp), jnp.float32),
        jnp.full((bq, 1), MASKED, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, kv_refs[0].shape[-1] // bk, body, init)
    seen = denom > 0  # denom >= 1 as soon as one key is visible
    denom = jnp.where(seen, denom, 1.0)
    o_ref[...] = jnp.where(seen, acc / denom, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(denom), 0.0)


def _dq_kernel(*refs, cfg: Config):
    """dQ for one query tile, looping over key tiles."""
    q_ref, k_ref, v_ref, q_refs, kv_refs, (do_ref, lse_ref, delta_ref, dq_ref) = _split(refs, cfg)
    bk = cfg.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    qs = _load(q_refs)
    q_stats = _q_stats(qs)

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        ks = _load(kv_refs, (slice(None), pl.ds(start, bk)))

        def update(dq):
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            p = _probs(q, k, qs, ks, lse, cfg)
            ds = p * (_dot(do, v, NT) - delta)
            return dq + _dot(ds.astype(k.dtype), k, NN)

        return lax.cond(_hit(q_stats, _kv_stats(ks), cfg), update, lambda d: d, dq)

    dq = lax.fori_loop(0, kv_refs[0].shape[-1] // bk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Config):
    """dK, dV for one key tile, looping over all (group-folded) query tiles."""
    q_ref, k_ref, v_ref, q_refs, kv_refs, rest = _split(refs, cfg)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    bq = cfg.block_q
    k, v = k_ref[...], v_ref[...]
    ks = _load(kv_refs)
    kv_stats = _kv_stats(ks)

    def body(i, carry):
        start = pl.multiple_of(i * bq, bq)
        qs = _load(q_refs, (pl.ds(start, bq), slice(None)))

        def update(carry):
            dk, dv = carry
            q = q_ref[pl.ds(start, bq), :]
            do = do_ref[pl.ds(start, bq), :]
            p = _probs(q, k, qs, ks, lse_ref[pl.ds(start, bq), :], cfg)
            ds = p * (_dot(do, v, NT) - delta_ref[pl.ds(start, bq), :])
            return dk + _dot(ds.astype(q.dtype), q, TN), dv + _dot(p.astype(do.dtype), do, TN)

        return lax.cond(_hit(_q_stats(qs), kv_stats, cfg), update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_refs[0].shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _compiler_params(cfg: Config, head_dim: int):
    if cfg.platform == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return None


def _call(kernel, name: str, cfg: Config, grid, in_specs, out_specs, out_shape, *args):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, args[0].shape[-1]),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def _specs(rows: int, keys: int, hp: int, cfg: Config, tiled: str):
    """BlockSpecs ``(q-like, kv-like, mask specs, row stats)`` for a (batch, KV head, tile)
    grid whose tile axis runs over ``tiled`` ("q" or "k"); the other axis is whole. The
    mask specs are those of ``q_pos, kv_pos`` (then ``q_seg, kv_seg`` with segments)."""
    tile_q = tiled == "q"
    bq, bk = (cfg.block_q, keys) if tile_q else (rows, cfg.block_k)

    def qi(i):
        return i if tile_q else 0

    def ki(i):
        return 0 if tile_q else i

    q_col = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, qi(i), 0))
    kv_row = pl.BlockSpec((None, 1, bk), lambda b, h, i: (b, 0, ki(i)))
    return (
        pl.BlockSpec((None, None, bq, hp), lambda b, h, i: (b, h, qi(i), 0)),
        pl.BlockSpec((None, None, bk, hp), lambda b, h, i: (b, h, ki(i), 0)),
        [q_col, kv_row] * (2 if cfg.segments else 1),
        pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, qi(i), 0)),
    )


def _mask_args(q_pos, kv_pos, q_seg, kv_seg) -> tuple:
    return (q_pos, kv_pos) if q_seg is None else (q_pos, kv_pos, q_seg, kv_seg)


def _forward(q, k, v, m: tuple, cfg: Config):
    """Folded layout in (``m``: the folded mask arrays, then with ``cfg.quantized`` the
    scales ``[b,kh,1,keys]`` of K and V), ``(o [b,kh,T,hp], lse [b,kh,T,1] fp32)`` out."""
    b, kh, rows, hp = q.shape
    keys = k.shape[2]
    q_spec, kv_spec, mask_specs, stat_spec = _specs(rows, keys, hp, cfg, "q")
    if cfg.quantized:
        mask_specs += [pl.BlockSpec((None, None, 1, keys), lambda b, h, i: (b, h, 0, 0))] * 2
    return _call(
        _fwd_kernel,
        "kvshare_flash_fwd",
        cfg,
        (b, kh, rows // cfg.block_q),
        [q_spec, kv_spec, kv_spec, *mask_specs],
        [q_spec, stat_spec],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows, 1), jnp.float32),
        ],
        q,
        k,
        v,
        *m,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: Config):
    return _forward(q, k, v, _mask_args(q_pos, kv_pos, q_seg, kv_seg), cfg)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: Config):
    m = _mask_args(q_pos, kv_pos, q_seg, kv_seg)
    o, lse = _forward(q, k, v, m, cfg)
    return o, (q, k, v, m, o, lse)


def _flash_bwd(cfg: Config, res, do):
    q, k, v, m, o, lse = res
    b, kh, rows, hp = q.shape
    keys = k.shape[2]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    args = (q, k, v, *m, do, lse, delta)

    q_spec, kv_spec, mask_specs, stat_spec = _specs(rows, keys, hp, cfg, "q")
    dq = _call(
        _dq_kernel,
        "kvshare_flash_dq",
        cfg,
        (b, kh, rows // cfg.block_q),
        [q_spec, kv_spec, kv_spec, *mask_specs, q_spec, stat_spec, stat_spec],
        q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        *args,
    )

    q_spec, kv_spec, mask_specs, stat_spec = _specs(rows, keys, hp, cfg, "k")
    dk, dv = _call(
        _dkv_kernel,
        "kvshare_flash_dkv",
        cfg,
        (b, kh, keys // cfg.block_k),
        [q_spec, kv_spec, kv_spec, *mask_specs, q_spec, stat_spec, stat_spec],
        [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        *args,
    )
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public


def _check_inputs(q, k, v, mask: Mask) -> None:
    if not isinstance(mask, Mask):
        raise TypeError(f"expected a masks.Mask, got {type(mask).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [b,t,n,h] and k, v [b,s,kh,h], got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    (b, t, n, h), (bk, s, kh, hk) = q.shape, k.shape
    if bk != b or hk != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({kh})")
    if t == 0 or s == 0:
        raise ValueError(f"empty sequence: t={t}, s={s}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype, float32 or bfloat16; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    _check_mask(mask, b, t, s)


def _check_mask(mask: Mask, b: int, t: int, s: int) -> None:
    q_pos, kv_pos = mask.q_pos, mask.kv_pos
    if q_pos.shape != (b, t) or kv_pos.shape != (b, s):
        raise ValueError(
            f"positions must be q_pos [b,t]={(b, t)} and kv_pos [b,s]={(b, s)}, "
            f"got {q_pos.shape} and {kv_pos.shape}"
        )
    if not (jnp.issubdtype(q_pos.dtype, jnp.integer) and jnp.issubdtype(kv_pos.dtype, jnp.integer)):
        raise ValueError(f"positions must be integers, got {q_pos.dtype} and {kv_pos.dtype}")
    if mask.segmented:
        q_seg, kv_seg = mask.q_seg, mask.kv_seg
        if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
            raise ValueError(
                f"segment ids must be q_seg [b,t]={(b, t)} and kv_seg [b,s]={(b, s)}, "
                f"got {q_seg.shape} and {kv_seg.shape}"
            )
        if not (
            jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)
        ):
            raise ValueError(f"segment ids must be integers, got {q_seg.dtype} and {kv_seg.dtype}")


def _int32(mask: Mask) -> Mask:
    """The mask with int32 arrays (what the kernels read)."""
    return jax.tree.map(lambda x: x.astype(jnp.int32), mask)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
) -> jax.Array:
    """Single-device flash attention: ``q [b,t,n,h]``, ``k, v [b,s,kh,h]`` and a
    :class:`~kvshare_jax.masks.Mask` (positions ``[b,t]``/``[b,s]``, optional segment ids,
    strict, window) -> ``[b,t,n,h]`` in ``q.dtype``.

    Same result as ``xla_attention``; differentiable in ``q, k, v``. ``platform``
    ("cpu", "gpu"/"cuda"/"rocm", "tpu") is the target; None means
    :func:`~kvshare_jax.target.target_platform` (ambient mesh, else default backend).
    ``interpret=True`` forces interpret mode of the target's kernel; None means interpret
    mode only on CPU, where ``False`` raises ``ValueError``. ``block_q`` counts
    group-folded query rows (``t * n // kh`` in all), ``block_k`` keys (rules:
    :func:`block_size`; on TPU :func:`kvshare_jax.kernels.flash_tpu.block_sizes`).
    ``device_kind`` (e.g. "TPU v5 lite") picks the TPU generation's blocks; None means
    :func:`~kvshare_jax.target.target_device_kind`.
    """
    _check_inputs(q, k, v, mask)
    target = target_platform(platform)
    mask = _int32(mask)
    if target == "tpu":
        kind = target_device_kind() if device_kind is None else device_kind
        return flash_attention_tpu(
            q, k, v, mask, block_q=block_q, block_k=block_k, interpret=bool(interpret),
            device_kind=kind,
        )  # fmt: skip
    interpret = _interpret_on(target, interpret)
    s, kh = k.shape[1], k.shape[2]
    cfg = _triton_config(q, s, kh, mask, block_q, block_k, target, interpret)
    return _flash_folded(q, k, v, mask, cfg, False)


def _interpret_on(target: str, interpret: bool | None) -> bool:
    if target == "cpu" and interpret is False:
        raise ValueError(
            "compiled Pallas kernels are not available on 'cpu': pass interpret=True "
            "(or a gpu/tpu platform)"
        )
    return True if target == "cpu" else bool(interpret)


def _triton_config(q, s, kh, mask: Mask, block_q, block_k, target, interpret) -> Config:
    b, t, n, h = q.shape
    return Config(
        scale=h**-0.5,
        mask=mask.spec,
        block_q=block_size(block_q, t * (n // kh), target, "q"),
        block_k=block_size(block_k, s, target, "k"),
        platform=target,
        interpret=bool(interpret),
    )


def flash_cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    layout: str,
    block_k: int | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    device_kind: str | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Single-device attention of ``q [b,t,n,h]`` over decode-cache slots viewed per batch
    row: ``k, v [b,kh,S,h]`` (``layout="SH"``) or ``[b,kh,h,S]`` (``"HS"``) -> ``[b,t,n,h]``;
    inference only. The slot a target's kernel reads as stored: HS on TPU (the Mosaic
    decode kernel), SH on GPU and in interpret mode (head-major Triton kernels); the other
    layout is transposed first (a copy of the slot). Quantized slots (int8, fp8) come with
    ``scales = (k_scale, v_scale)``, each ``[b,kh,S]`` fp32, applied in the kernel. Other
    arguments as in :func:`flash_attention`."""
    target = target_platform(platform)
    interpret = _interpret_on(target, interpret)
    _check_mask(mask, q.shape[0], q.shape[1], k.shape[3] if layout == "HS" else k.shape[2])
    mask = _int32(mask)
    if target == "tpu":
        if layout == "HS":
            kind = target_device_kind() if device_kind is None else device_kind
            return cache_attention_tpu(
                q, k, v, mask, block_k=block_k, interpret=interpret, device_kind=kind,
                scales=scales,
            )  # fmt: skip
        if scales is not None:
            raise ValueError("quantized cache slots on TPU need the HS layout")
        k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # -> [b, S, kh, h]
        return flash_attention(
            q, k, v, mask, block_k=block_k, platform="tpu", interpret=interpret,
            device_kind=device_kind,
        )  # fmt: skip
    if layout == "HS":
        k, v = (x.transpose(0, 1, 3, 2) for x in (k, v))  # -> [b, kh, S, h]
    cfg = _triton_config(q, k.shape[2], k.shape[1], mask, None, block_k, target, interpret)
    if scales is not None:
        cfg = dataclasses.replace(cfg, quantized=True)
    return _flash_folded(q, k, v, mask, cfg, True, scales)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _flash_folded(q, k, v, mask: Mask, cfg: Config, heads_major: bool, scales=None) -> jax.Array:
    """Fold GQA into rows, pad, run the kernel, unfold (see the module docstring). K/V
    come time-major ``[b,s,kh,h]``, or head-major ``[b,kh,s,h]`` with ``heads_major``
    (decode-cache slots: then nothing of them is copied unless padding is needed);
    quantized slots with their ``scales`` (``[b,kh,s]`` each; forward only)."""
    b, t, n, h = q.shape
    s, kh = (k.shape[2], k.shape[1]) if heads_major else (k.shape[1], k.shape[2])
    g = n // kh
    hp = padded_head_dim(h, cfg.platform)
    rows = t * g
    pad_rows = round_up(rows, cfg.block_q) - rows
    pad_keys = round_up(s, cfg.block_k) - s

    qf = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, pad_rows), (0, hp - h)))
    if not heads_major:
        k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
    if pad_keys or hp != h:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_keys), (0, hp - h))) for x in (k, v))

    def q_col(x):  # rows repeat the last query (no wider tile range)
        return jnp.pad(jnp.repeat(x, g, axis=1), ((0, 0), (0, pad_rows)), mode="edge")[:, :, None]

    def kv_row(x, fill):
        return jnp.pad(x, ((0, 0), (0, pad_keys)), constant_values=fill)[:, None, :]

    qs = ks = None
    if mask.segmented:  # padded keys are invalid by position: their segment is moot
        qs, ks = q_col(mask.q_seg), kv_row(mask.kv_seg, 0)
    qp, kp = q_col(mask.q_pos), kv_row(mask.kv_pos, INVALID_POS)
    if scales is None:
        o = _flash(qf, k, v, qp, kp, qs, ks, cfg)
    else:  # inference only: no VJP
        sk, sv = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_keys)))[:, :, None] for x in scales)
        o = _forward(qf, k, v, (*_mask_args(qp, kp, qs, ks), sk, sv), cfg)[0]
    o = o[:, :, :rows, :h].reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, t, n, h)
