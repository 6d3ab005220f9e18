"""TPU (Mosaic) flash attention with the KV-sharing position masks: forward, backward and a
decode kernel.

Shapes: b batch, t query length, s key length, n query heads, kh KV heads
(``n % kh == 0``, GQA group ``g = n // kh``), h head dim; ``R = t * g`` folded query rows
per KV head (padded to ``Rp``), ``Sp`` keys after padding.

Semantics are those of :func:`kvshare_jax.kernels.flash.flash_attention` (and of the XLA
reference), with one :class:`kvshare_jax.masks.Mask`: a key at ``kp`` is visible to a
query at ``qp`` iff ``kp <= qp`` (``kp < qp`` when ``strict``), ``kp > qp - window``
with a window, the segments are equal when the mask has segment ids, and
``kp != INVALID_POS``; a row that sees no key outputs 0 with zero gradients; softmax
statistics and accumulation are fp32; the output has ``q``'s dtype.

Unlike the Triton kernel, whose programs loop over the whole other sequence (so whole
K/V, or whole Q/dO, would be VMEM blocks), every operand here is a tile and the
reduction runs over the last grid axis, with fp32 accumulators in ``pltpu.VMEM`` scratch
initialised at the first reduction step and written out at the last:

- forward and dQ: grid ``(b, kh, Rp // bq, Sp // bk)``, semantics
  ``("parallel", "parallel", "parallel", "arbitrary")``; scratch ``m, l [bq, 1]`` and
  ``acc [bq, h]`` (resp. ``dq [bq, h]``).
- dK/dV: grid ``(b, kh, Sp // bk, Rp // bq)``, same semantics; scratch
  ``dk, dv [bk, h]``. GQA is folded into the rows, so dK/dV of a KV head sum over its
  whole query group inside the kernel. Scores are computed transposed (``[bk, bq]``),
  so the lane-dense row statistics broadcast as they are and no matmul needs a
  transposed left operand.
- decode over the cache (:func:`cache_attention_tpu`, inference only): K/V are the
  decode cache's time-minor slots viewed per batch row, ``[b, kh, h, S]`` (time on the
  128 lanes, so the slots are lane-dense for h = 64 and 128 and read as stored: no
  transpose, no copy). Grid ``(b, S // bk)``, ``("parallel", "arbitrary")``; a tile holds
  all ``kh`` KV heads, ``[kh, h, bk]``; per head the folded queries ``[t * g, h]`` give
  scores ``q @ k`` ``[t * g, bk]`` and the update ``p @ v^T``, with scratch
  ``m, l [kh, t * g, 1]`` and ``acc [kh, t * g, h]``. The key tile fills
  ``decode_tile_bytes`` and divides the cache length when it can (:func:`decode_block`);
  key tiles past the written positions are skipped and not fetched.

Layout of the training kernels (built by the wrapper): GQA folded into query rows as in
the Triton kernel (``q [b, kh, Rp, h]``, row ``r`` is token ``r // g``, group member
``r % g``); ``k, v [b, kh, Sp, h]``. Per-row vectors live in HBM as lane-dense rows,
since a ``[rows, 1]`` array is padded to 128 lanes by the TPU tiled layout (which cost
128 x the bytes: 1 GiB for lse + delta at t = 32k, n = 32, kh = 4): positions
``q_pos [b, 1, Rp]``, ``kv_pos [b, 1, Sp]``, statistics ``lse, delta [b, kh, 1, Rp]``
fp32; kernels transpose a tile's row to a column where they need one. Rows are padded
by repeating the last position, keys with ``INVALID_POS``. The head dim is never
padded: a block spanning the whole head dim is legal for Mosaic at any size (compiles
for h = 32, 64, 128).

Tile skipping: the wrapper computes per query tile the ``[min, max]`` position, per key
tile the ``[min, max]`` over valid keys and whether all its keys are valid, with segment
ids also each tile's ``[min, max]`` segment (4 more scalar-prefetch arrays; segment ids
themselves are two more lane-dense row inputs after the positions); these reach SMEM by
scalar prefetch. A grid step computes only if the two ranges can overlap the mask
(``pl.when``; tiles wholly in other documents never do), and a pair that is wholly
visible (all keys valid, inside the causal and window band for every row, one and the
same document) skips the mask arithmetic (:mod:`kvshare_jax.kernels.common`). The
index maps clamp the reduction tile into the ``[first, last]`` tiles that can overlap the
current one, so a skipped step maps to a block already in VMEM (or the next one needed)
and issues no DMA. The test is exact for any positions; it saves work when positions are
sorted within tiles of a document (training ``arange``, decode caches with
``INVALID_POS`` in unwritten slots). Positions are
expected to be non-negative (``qp - window`` must not overflow int32).

Block sizes come from :data:`GENERATION_BLOCKS` by ``device_kind`` (see
:func:`block_sizes`, :func:`decode_block`). Time-major K/V at decode shapes (a one-token
prefill, say) go through the training kernels.

Verification: the kernels run in the TPU interpreter (``interpret=True``) against the
XLA reference in the tests, and compile with Mosaic for v4, v5e, v5p and v6e topologies
on a CPU host (``tests/test_kernels_compile.py``); they have not run on a TPU here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvshare_jax.kernels.common import (
    MASKED,
    NN,
    NT,
    Config,
    kv_range,
    may_overlap,
    round_up,
    seg_range,
    wholly_visible,
)
from kvshare_jax.masks import INVALID_POS, Mask, visible

_LANES = 128  # key tiles are multiples of 128 lanes unless they span all keys
_SHORT_ROWS = 32  # folded rows up to which the training kernels take long key tiles


# ----------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Default tiles of one TPU generation: ``block_q`` folded query rows and ``block_k``
    keys for the training kernels; ``decode_tile_bytes``, the VMEM size of one K (or V)
    tile when the query rows are few (decode), sets the key tile there."""

    block_q: int
    block_k: int
    decode_tile_bytes: int


# Chosen so that each kernel's VMEM (double-buffered tiles, the fp32 [bq, bk] score,
# probability and gradient temporaries, scratch) stays well under the default scoped
# VMEM limit (16 MiB on v4/v5e/v5p, 32 MiB on v6e) for h up to 128 in fp32; v5p and v6e
# (256-wide MXU on v6e) get longer key tiles, v6e longer decode tiles. Checked by
# compiling, not tuned on hardware.
GENERATION_BLOCKS: dict[str, BlockSizes] = {
    "v4": BlockSizes(block_q=512, block_k=512, decode_tile_bytes=1 << 20),
    "v5e": BlockSizes(block_q=512, block_k=512, decode_tile_bytes=1 << 20),
    "v5p": BlockSizes(block_q=512, block_k=1024, decode_tile_bytes=1 << 20),
    "v6e": BlockSizes(block_q=512, block_k=1024, decode_tile_bytes=2 << 20),
}
DEFAULT_BLOCKS = BlockSizes(block_q=256, block_k=512, decode_tile_bytes=512 << 10)

_KINDS = {  # device_kind, lower case -> generation
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
}


def generation(device_kind: str | None) -> str | None:
    """``"TPU v5 lite"`` -> ``"v5e"`` (also v4, v5p = ``"TPU v5"``, v6e =
    ``"TPU v6 lite"``); None for an unknown or missing kind."""
    return _KINDS.get((device_kind or "").strip().lower())


def _defaults(device_kind: str | None) -> BlockSizes:
    return GENERATION_BLOCKS.get(generation(device_kind), DEFAULT_BLOCKS)


def _row_bytes(h: int, dtype) -> int:
    """VMEM bytes of one K/V row: the head dim is padded to whole 128-lane vregs."""
    return round_up(h, _LANES) * jnp.dtype(dtype).itemsize


def row_align(dtype) -> int:
    """Sublane alignment of a query-row tile: 8 rows (16 for 2-byte dtypes)."""
    return 16 if jnp.dtype(dtype).itemsize == 2 else 8


def _check_block(block, axis: str, align: int) -> int:
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block_{axis} must be a positive int, got {block!r}")
    if block % align:
        raise ValueError(f"block_{axis}={block}: TPU needs a multiple of {align}")
    return int(block)


def _key_budget(tile_bytes: int, row_bytes: int) -> int:
    """Keys (a multiple of 128) whose rows fill ``tile_bytes``."""
    return max(_LANES, tile_bytes // row_bytes // _LANES * _LANES)


def block_sizes(
    rows: int,
    keys: int,
    h: int,
    dtype,
    device_kind: str | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[int, int]:
    """``(bq, bk)`` of the training kernels for ``rows`` folded query rows, ``keys`` keys
    and head dim ``h``.

    Defaults come from :data:`GENERATION_BLOCKS` by ``device_kind`` (e.g.
    ``"TPU v5 lite"``; :data:`DEFAULT_BLOCKS` when unknown). A query tile longer than the
    rows shrinks to them rounded up to the sublane alignment (:func:`row_align`); a key
    tile longer than the keys becomes all keys (a whole-array block). With at most 32
    rows in all (decode), the default key tile fills ``decode_tile_bytes``. Raises
    ``ValueError`` unless ``block_q`` is a multiple of 8 (16 for bfloat16) and
    ``block_k`` of 128.
    """
    d = _defaults(device_kind)
    align = row_align(dtype)
    bq = _check_block(d.block_q if block_q is None else block_q, "q", align)
    bq = min(bq, round_up(rows, align))
    if block_k is None:
        block_k = d.block_k
        if bq <= _SHORT_ROWS:  # a few rows (decode via this path): fewer, longer steps
            block_k = max(block_k, _key_budget(d.decode_tile_bytes, _row_bytes(h, dtype)))
    bk = _check_block(block_k, "k", _LANES)
    return bq, min(bk, keys)


def decode_block(
    keys: int,
    kv_heads: int,
    h: int,
    dtype,
    device_kind: str | None = None,
    block_k: int | None = None,
) -> int:
    """Keys per tile of the decode kernel, whose K (or V) tile is ``[kv_heads, h, bk]``
    (time on the lanes, ``h`` on sublanes).

    The budget is the keys whose tile fills ``decode_tile_bytes`` (a multiple of 128), or
    ``block_k`` (a multiple of 128). All keys if they fit; else the largest multiple of
    128 within the budget that divides ``keys`` (so the cache needs no padding copy), if
    one is at least a quarter of the budget; else the budget (keys padded).
    """
    if block_k is None:
        key_bytes = kv_heads * round_up(h, row_align(dtype)) * jnp.dtype(dtype).itemsize
        budget = _key_budget(_defaults(device_kind).decode_tile_bytes, key_bytes)
    else:
        budget = _check_block(block_k, "k", _LANES)
    if keys <= budget:
        return keys
    for bk in range(budget, max(_LANES, budget // 4) - 1, -_LANES):
        if keys % bk == 0:
            return bk
    return budget


# ----------------------------------------------------------------------------- config


def _config(h: int, mask: Mask, block_q: int, block_k: int, interpret) -> Config:
    """The kernel config of head dim ``h`` (scale ``h ** -0.5``) and ``mask``'s rule."""
    return Config(h**-0.5, mask.spec, block_q, block_k, "tpu", bool(interpret))


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """fp32-accumulated product. 16-bit operands get an explicit default precision: Mosaic
    rejects a global ``jax_default_matmul_precision="highest"`` for them ("Bad lhs
    type"); fp32 operands follow the global setting, like the XLA reference."""
    precision = lax.Precision.DEFAULT if a.dtype.itemsize < 4 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_ranges(qp, kp, qs, ks, bq: int, bk: int, cfg: Config):
    """Scalar-prefetch arrays (int32, flat) from ``qp [b, Rp]``, ``kp [b, Sp]`` (and the
    segment ids ``qs, ks`` or None): ``(q_lo, q_hi, kv_lo, kv_hi, kv_all)`` per tile,
    with segments also ``(qs_lo, qs_hi, ks_lo, ks_hi)``; and per query tile resp. per
    key tile the ``(first, last)`` tile of the other axis that can overlap it (0, 0 if
    none)."""
    b = qp.shape[0]
    qt = qp.reshape(b, -1, bq)
    kt = kp.reshape(b, -1, bk)
    q_lo, q_hi = qt.min(-1), qt.max(-1)
    kv_lo, kv_hi = kv_range(kt, axis=-1)
    kv_all = (kt != INVALID_POS).all(-1)
    ranges = [q_lo, q_hi, kv_lo, kv_hi, kv_all]
    segs = None
    if qs is not None:
        st = qs.reshape(b, -1, bq)
        segs = (st.min(-1), st.max(-1), *seg_range(kt, ks.reshape(b, -1, bk), axis=-1))
        ranges += segs
        segs = (segs[0][:, :, None], segs[1][:, :, None], segs[2][:, None, :], segs[3][:, None, :])
    hit = may_overlap(
        q_lo[:, :, None], q_hi[:, :, None], kv_lo[:, None, :], kv_hi[:, None, :], cfg.mask, segs
    )

    def first_last(hit):  # over the last axis
        n = hit.shape[-1]
        first = jnp.argmax(hit, -1)
        last = n - 1 - jnp.argmax(hit[..., ::-1], -1)
        any_ = hit.any(-1)
        return tuple(jnp.where(any_, x, 0).astype(jnp.int32).reshape(-1) for x in (first, last))

    ranges = tuple(x.astype(jnp.int32).reshape(-1) for x in ranges)
    return ranges, first_last(hit), first_last(hit.transpose(0, 2, 1))


def _prefetch_count(cfg: Config) -> int:
    """Scalar-prefetch refs of a kernel: the ranges (:func:`_tile_ranges`), first, last."""
    return 11 if cfg.segments else 7


# ----------------------------------------------------------------------------- kernels


class _Tiles:
    """The scalar-prefetch refs (SMEM) of one kernel: ranges (with segments also the
    segment ranges), then ``first, last``."""

    def __init__(self, refs, nq: int, nk: int):
        self.q_lo, self.q_hi, self.kv_lo, self.kv_hi, self.kv_all = refs[:5]
        self.segs = refs[5:9] if len(refs) == 11 else None
        self.nq, self.nk = nq, nk

    def hit_full(self, b, i, j, cfg: Config):
        """(may overlap, wholly visible) for query tile ``i``, key tile ``j`` of row ``b``."""
        qt, kt = b * self.nq + i, b * self.nk + j
        q_lo, q_hi = self.q_lo[qt], self.q_hi[qt]
        kv_lo, kv_hi = self.kv_lo[kt], self.kv_hi[kt]
        segs = None
        if self.segs is not None:
            qs_lo, qs_hi, ks_lo, ks_hi = self.segs
            segs = (qs_lo[qt], qs_hi[qt], ks_lo[kt], ks_hi[kt])
        full = wholly_visible(q_lo, q_hi, kv_lo, kv_hi, self.kv_all[kt], cfg.mask, segs)
        return may_overlap(q_lo, q_hi, kv_lo, kv_hi, cfg.mask, segs), full


def _split(refs, cfg: Config, nq: int, nk: int):
    """``(tiles, q, k, v, (q_pos, q_seg), (kv_pos, kv_seg), rest)`` of a kernel's refs:
    scalar prefetch, then q, k, v, the mask refs (segment refs after the position refs
    when the mask has segments), then the kernel's others."""
    n = _prefetch_count(cfg)
    tiles = _Tiles(refs[:n], nq, nk)
    q_ref, k_ref, v_ref, qp_ref, kp_ref = refs[n : n + 5]
    if cfg.segments:
        qs_ref, ks_ref = refs[n + 5 : n + 7]
        return tiles, q_ref, k_ref, v_ref, (qp_ref, qs_ref), (kp_ref, ks_ref), refs[n + 7 :]
    return tiles, q_ref, k_ref, v_ref, (qp_ref, None), (kp_ref, None), refs[n + 5 :]


def _vis(q_side, kv_side, cfg: Config, q_row: bool = False, kv_col: bool = False):
    """The tile mask from the mask refs of both sides; a side stored as a lane-dense row
    of queries (``q_row``) or a key column (``kv_col``) is transposed first."""

    def load(ref, transpose):
        return None if ref is None else (ref[...].T if transpose else ref[...])

    qp, qs = (load(r, q_row) for r in q_side)
    kp, ks = (load(r, kv_col) for r in kv_side)
    return visible(qp, kp, cfg.mask, qs, ks)


def _run(tiles: _Tiles, b, i, j, cfg: Config, step) -> None:
    """``step(masked)`` for the tile pair ``(i, j)`` if it can overlap the mask; the
    unmasked variant when every pair is visible."""
    hit, full = tiles.hit_full(b, i, j, cfg)

    @pl.when(jnp.logical_and(hit, full))
    def _():
        step(False)

    @pl.when(jnp.logical_and(hit, jnp.logical_not(full)))
    def _():
        step(True)


def _scores(q, k, vis, cfg: Config, time_minor: bool = False, k_scale=None):
    """Scaled fp32 scores ``[rows, keys]`` from ``k [keys, h]`` (``[h, keys]`` when
    ``time_minor``; quantized with the scales ``k_scale [1, keys]``), masked where
    ``vis`` (if any) is False."""
    s = _dot(q, k, NN if time_minor else NT) * cfg.scale
    s = s if k_scale is None else s * k_scale
    return s if vis is None else jnp.where(vis, s, MASKED)


def _softmax_step(
    q, k, v, vis, m_scr, l_scr, acc_scr, cfg: Config, time_minor=False, scales=()
) -> None:
    """One online-softmax update of the fp32 scratch with a K/V tile (``[keys, h]``, or
    ``[h, keys]`` when ``time_minor``); quantized K/V with ``scales = (k_scale, v_scale)``,
    ``[1, keys]`` each, are converted to ``q``'s dtype in VMEM (via fp32) and scaled in
    the scores and the probabilities."""
    if scales:
        k, v = (x.astype(jnp.float32).astype(q.dtype) for x in (k, v))
    s = _scores(q, k, vis, cfg, time_minor, scales[0] if scales else None)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = p * scales[1] if scales else p
    acc_scr[...] = alpha * acc_scr[...] + _dot(pv.astype(v.dtype), v, NT if time_minor else NN)
    m_scr[...] = m_new


def _softmax_init(m_scr, l_scr, acc_scr) -> None:
    m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def _softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr) -> None:
    """Normalised output (0 for rows that saw no key) and, if wanted, the row lse."""
    denom = l_scr[...]
    seen = denom > 0  # >= 1 as soon as one key is visible
    denom = jnp.where(seen, denom, 1.0)
    o_ref[...] = jnp.where(seen, acc_scr[...] / denom, 0.0).astype(o_ref.dtype)
    if lse_ref is not None:  # a lane-dense row [1, bq]
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(denom), 0.0).T


def _fwd_kernel(*refs, cfg: Config, nq: int, nk: int, save_lse: bool):
    tiles, q_ref, k_ref, v_ref, q_side, kv_side, rest = _split(refs, cfg, nq, nk)
    o_ref = rest[0]
    lse_ref = rest[1] if save_lse else None
    scratch = refs[-3:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        _softmax_init(*scratch)

    def step(masked: bool):
        # query positions (and segments) arrive as a row [1, bq]
        vis = _vis(q_side, kv_side, cfg, q_row=True) if masked else None
        _softmax_step(q_ref[...], k_ref[...], v_ref[...], vis, *scratch, cfg)

    _run(tiles, b, i, j, cfg, step)

    @pl.when(j == nk - 1)
    def _():
        _softmax_finish(o_ref, lse_ref, *scratch)


def _probs(q, k, vis, lse, cfg: Config):
    """Normalised probabilities recomputed from the log-sum-exp: ``[bq, bk]`` from
    ``q [bq, h]``, ``k [bk, h]``, column ``lse [bq, 1]``, or the transpose ``[bk, bq]``
    from swapped operands (column keys, row queries); ``vis`` the tile mask or None
    (wholly visible)."""
    p = jnp.exp(_scores(q, k, vis, cfg) - lse)
    return p if vis is None else jnp.where(vis, p, 0.0)


def _dq_kernel(*refs, cfg: Config, nq: int, nk: int):
    tiles, q_ref, k_ref, v_ref, q_side, kv_side, rest = _split(refs, cfg, nq, nk)
    do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked: bool):  # row vectors [1, bq] -> columns [bq, 1]
        k = k_ref[...]
        vis = _vis(q_side, kv_side, cfg, q_row=True) if masked else None
        p = _probs(q_ref[...], k, vis, lse_ref[...].T, cfg)
        ds = p * (_dot(do_ref[...], v_ref[...], NT) - delta_ref[...].T)
        dq_scr[...] += _dot(ds.astype(k.dtype), k, NN)

    _run(tiles, b, i, j, cfg, step)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Config, nq: int, nk: int):
    tiles, q_ref, k_ref, v_ref, q_side, kv_side, rest = _split(refs, cfg, nq, nk)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked: bool):
        # Transposed scores [bk, bq]: the row statistics broadcast along sublanes and
        # both updates are plain (untransposed-LHS) matmuls. Query rows [1, bq] stay
        # rows, key rows [1, bk] become columns.
        q, do = q_ref[...], do_ref[...]
        vis = _vis(q_side, kv_side, cfg, kv_col=True) if masked else None
        pt = _probs(k_ref[...], q, vis, lse_ref[...], cfg)
        dv_scr[...] += _dot(pt.astype(do.dtype), do, NN)
        dst = pt * (_dot(v_ref[...], do, NT) - delta_ref[...])
        dk_scr[...] += _dot(dst.astype(q.dtype), q, NN)

    _run(tiles, b, i, j, cfg, step)

    @pl.when(i == nq - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _cache_kernel(*refs, cfg: Config, nk: int, kh: int):
    """Decode over cache slots ``[kh, h, bk]`` (time on the lanes) for all KV heads of one
    batch row; per head ``q [r, h] @ k [h, bk]`` and ``p [r, bk] @ v[h, bk]^T``; quantized
    slots with scale tiles ``[kh, bk]`` (K's, V's) after the mask refs."""
    tiles, q_ref, k_ref, v_ref, q_side, kv_side, rest = _split(refs, cfg, 1, nk)
    scales, rest = (rest[:2], rest[2:]) if cfg.quantized else ((), rest)
    o_ref, m_scr, l_scr, acc_scr = rest
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        _softmax_init(m_scr, l_scr, acc_scr)

    def step(masked: bool):
        vis = _vis(q_side, kv_side, cfg) if masked else None  # query columns [r, 1]
        for hd in range(kh):  # static: a few KV heads per batch row
            scratch = (m_scr.at[hd], l_scr.at[hd], acc_scr.at[hd])
            row = tuple(x[pl.ds(hd, 1), :] for x in scales)  # [1, bk]
            _softmax_step(q_ref[hd], k_ref[hd], v_ref[hd], vis, *scratch, cfg, True, row)

    _run(tiles, b, 0, j, cfg, step)

    @pl.when(j == nk - 1)
    def _():
        for hd in range(kh):
            _softmax_finish(o_ref.at[hd], None, m_scr.at[hd], l_scr.at[hd], acc_scr.at[hd])


# ----------------------------------------------------------------------------- calls


def _clamp(i, lo, hi):
    return jnp.minimum(jnp.maximum(i, lo), hi)


def _specs(cfg: Config, h: int, nq: int, nk: int, kv_major: bool):
    """BlockSpecs ``(q-like, kv-like, mask specs, row stats)`` of a training kernel
    (positions, segment ids and statistics are lane-dense rows ``[1, tile]``; the mask
    specs are those of ``q_pos, kv_pos``, then ``q_seg, kv_seg`` with segments)
    over the grid ``(b, kh, i, j)`` (``kv_major=False``: i query tile, j key tile,
    j reduced) or ``(b, kh, j, i)`` (``kv_major=True``, i reduced). The reduced index is
    clamped into the ``[first, last]`` tiles that can overlap the current tile, so a
    skipped step maps to a block already in VMEM (or the next one needed): no DMA."""
    bq, bk = cfg.block_q, cfg.block_k

    def tiles(b, x, y, refs):  # (query tile, key tile) to load
        first, last = refs[-2], refs[-1]
        if kv_major:
            t = b * nk + x
            return _clamp(y, first[t], last[t]), x
        t = b * nq + x
        return x, _clamp(y, first[t], last[t])

    def q_map(b, hd, x, y, *refs):
        return b, hd, tiles(b, x, y, refs)[0], 0

    def kv_map(b, hd, x, y, *refs):
        return b, hd, tiles(b, x, y, refs)[1], 0

    def qpos_map(b, hd, x, y, *refs):
        return b, 0, tiles(b, x, y, refs)[0]

    def stat_map(b, hd, x, y, *refs):
        return b, hd, 0, tiles(b, x, y, refs)[0]

    def kvpos_map(b, hd, x, y, *refs):
        return b, 0, tiles(b, x, y, refs)[1]

    mask = [pl.BlockSpec((None, 1, bq), qpos_map), pl.BlockSpec((None, 1, bk), kvpos_map)]
    return (
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
        mask * (2 if cfg.segments else 1),
        pl.BlockSpec((None, None, 1, bq), stat_map),
    )


def _call(kernel, name: str, cfg: Config, grid, prefetch, in_specs, out_specs, out_shape,
          scratch, cost: pl.CostEstimate, *args):  # fmt: skip
    semantics = ("parallel",) * (len(grid) - 1) + ("arbitrary",)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        cost_estimate=cost,
        name=name,
    )(*prefetch, *args)


def _cost(pairs: int, h: int, matmuls: int, *operands) -> pl.CostEstimate:
    """Work without skipping: ``pairs`` (row, key) scores, ``matmuls`` products of
    ``pairs x h`` each, one exp per pair; bytes of ``operands`` read or written once."""
    nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in operands)
    return pl.CostEstimate(
        flops=2 * matmuls * pairs * h, transcendentals=pairs, bytes_accessed=int(nbytes)
    )


def _ranges(m: tuple, cfg: Config):
    """:func:`_tile_ranges` of the folded mask arrays ``m`` (rows ``[b, 1, .]``)."""
    segs = (m[2][:, 0], m[3][:, 0]) if cfg.segments else (None, None)
    return _tile_ranges(m[0][:, 0], m[1][:, 0], *segs, cfg.block_q, cfg.block_k, cfg)


def _forward(q, k, v, m: tuple, cfg: Config, save_lse: bool):
    """Folded layout in (``m``: the folded mask arrays, :func:`_fold`); ``o [b, kh, Rp,
    h]`` and ``lse [b, kh, 1, Rp]`` fp32 (or None)."""
    b, kh, rows, h = q.shape
    keys = k.shape[2]
    nq, nk = rows // cfg.block_q, keys // cfg.block_k
    ranges, k_range, _ = _ranges(m, cfg)
    q_spec, kv_spec, mask_specs, stat_spec = _specs(cfg, h, nq, nk, kv_major=False)
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if save_lse:
        out_specs.append(stat_spec)
        out_shape.append(jax.ShapeDtypeStruct((b, kh, 1, rows), jnp.float32))
    out = _call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk, save_lse=save_lse),
        "kvshare_flash_tpu_fwd",
        cfg,
        (b, kh, nq, nk),
        (*ranges, *k_range),
        [q_spec, kv_spec, kv_spec, *mask_specs],
        out_specs,
        out_shape,
        [
            pltpu.VMEM((cfg.block_q, 1), jnp.float32),
            pltpu.VMEM((cfg.block_q, 1), jnp.float32),
            pltpu.VMEM((cfg.block_q, h), jnp.float32),
        ],
        _cost(b * kh * rows * keys, h, 2, q, k, v, q),
        q,
        k,
        v,
        *m,
    )
    return out[0], (out[1] if save_lse else None)


def _backward(q, k, v, m: tuple, o, lse, do, cfg: Config):
    """Folded layout in; ``(dq, dk, dv)`` in the folded layout."""
    b, kh, rows, h = q.shape
    keys = k.shape[2]
    nq, nk = rows // cfg.block_q, keys // cfg.block_k
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
    args = (q, k, v, *m, do, lse, delta)
    ranges, k_range, q_range = _ranges(m, cfg)
    pairs = b * kh * rows * keys

    q_spec, kv_spec, mask_specs, stat_spec = _specs(cfg, h, nq, nk, kv_major=False)
    dq = _call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
        "kvshare_flash_tpu_dq",
        cfg,
        (b, kh, nq, nk),
        (*ranges, *k_range),
        [q_spec, kv_spec, kv_spec, *mask_specs, q_spec, stat_spec, stat_spec],
        q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((cfg.block_q, h), jnp.float32)],
        _cost(pairs, h, 3, q, k, v, do, lse, delta, q),
        *args,
    )

    q_spec, kv_spec, mask_specs, stat_spec = _specs(cfg, h, nq, nk, kv_major=True)
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        "kvshare_flash_tpu_dkv",
        cfg,
        (b, kh, nk, nq),
        (*ranges, *q_range),
        [q_spec, kv_spec, kv_spec, *mask_specs, q_spec, stat_spec, stat_spec],
        [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((cfg.block_k, h), jnp.float32), pltpu.VMEM((cfg.block_k, h), jnp.float32)],
        _cost(pairs, h, 4, q, k, v, do, lse, delta, k, v),
        *args,
    )
    return dq, dk, dv


def _cache_decode(q, k, v, mask: Mask, cfg: Config, scales=None) -> jax.Array:
    """``q [b, t, n, h]`` over time-minor slots ``k, v [b, kh, h, S]`` (quantized: with
    ``scales``, ``[b, kh, S]`` each) -> ``[b, t, n, h]``."""
    b, t, n, h = q.shape
    kh, s = k.shape[1], k.shape[3]
    g = n // kh
    rows = t * g
    bk = cfg.block_k
    nk = s // bk
    # Row r of KV head j: token r // g, query head j * g + r % g (a copy of q only).
    qf = _fold_rows(q, kh, 0)
    qp = jnp.repeat(mask.q_pos, g, axis=1)
    qs = None if not cfg.segments else jnp.repeat(mask.q_seg, g, axis=1)
    ranges, k_range, _ = _tile_ranges(qp, mask.kv_pos, qs, mask.kv_seg, rows, bk, cfg)

    def at_kv(b, j, *refs):  # clamped key tile: skipped tiles are not fetched
        return _clamp(j, refs[-2][b], refs[-1][b])

    q_spec = pl.BlockSpec((None, kh, rows, h), lambda b, j, *r: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, kh, h, bk), lambda b, j, *r: (b, 0, 0, at_kv(b, j, *r)))
    q_col = pl.BlockSpec((None, rows, 1), lambda b, j, *r: (b, 0, 0))
    kv_row = pl.BlockSpec((None, 1, bk), lambda b, j, *r: (b, 0, at_kv(b, j, *r)))
    m = [qp[:, :, None], mask.kv_pos[:, None, :]]
    if cfg.segments:
        m += [qs[:, :, None], mask.kv_seg[:, None, :]]
    specs = [q_spec, kv_spec, kv_spec, *[q_col, kv_row] * (len(m) // 2)]
    if scales is not None:
        m += list(scales)
        specs += [pl.BlockSpec((None, kh, bk), lambda b, j, *r: (b, 0, at_kv(b, j, *r)))] * 2
    out = _call(
        functools.partial(_cache_kernel, cfg=cfg, nk=nk, kh=kh),
        "kvshare_flash_tpu_decode",
        cfg,
        (b, nk),
        (*ranges, *k_range),
        specs,
        q_spec,
        jax.ShapeDtypeStruct(qf.shape, q.dtype),
        [
            pltpu.VMEM((kh, rows, 1), jnp.float32),
            pltpu.VMEM((kh, rows, 1), jnp.float32),
            pltpu.VMEM((kh, rows, h), jnp.float32),
        ],
        _cost(b * kh * rows * s, h, 2, qf, k, v, qf, *(scales or ())),
        qf,
        k,
        v,
        *m,
    )
    return _unfold_rows(out, t, n)


# ----------------------------------------------------------------------------- layout


def _fold(q, k, v, mask: Mask, cfg: Config):
    """Original layout -> folded, padded ``(q [b,kh,Rp,h], k, v [b,kh,Sp,h], m)`` with the
    mask arrays ``m = (qp [b,1,Rp], kp [b,1,Sp])``, with segments also
    ``(qs [b,1,Rp], ks [b,1,Sp])``. Rows repeat the last query, keys pad as invalid."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    rows = t * g
    pad_rows = round_up(rows, cfg.block_q) - rows
    pad_keys = round_up(s, cfg.block_k) - s
    qf = _fold_rows(q, kh, pad_rows)
    kf, vf = (
        jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_keys), (0, 0))) for x in (k, v)
    )

    def q_row(x):
        return jnp.pad(jnp.repeat(x, g, axis=1), ((0, 0), (0, pad_rows)), mode="edge")[:, None]

    def kv_row(x, fill):
        return jnp.pad(x, ((0, 0), (0, pad_keys)), constant_values=fill)[:, None, :]

    m = (q_row(mask.q_pos), kv_row(mask.kv_pos, INVALID_POS))
    if cfg.segments:  # padded keys are invalid by position: their segment is moot
        m += (q_row(mask.q_seg), kv_row(mask.kv_seg, 0))
    return qf, kf, vf, m


def _fold_rows(x, kh: int, pad_rows: int):
    """``[b, t, n, h]`` -> ``[b, kh, t * g + pad_rows, h]`` (zero padding)."""
    b, t, n, h = x.shape
    g = n // kh
    x = x.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad_rows), (0, 0)))


def _unfold_rows(x, t: int, n: int):
    """``[b, kh, Rp, h]`` -> ``[b, t, n, h]`` (padding dropped)."""
    b, kh, _, h = x.shape
    x = x[:, :, : t * (n // kh)].reshape(b, kh, t, n // kh, h).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask: Mask, cfg: Config):
    o, _ = _forward(*_fold(q, k, v, mask, cfg), cfg, save_lse=False)
    return _unfold_rows(o, q.shape[1], q.shape[2])


def _attend_fwd(q, k, v, mask: Mask, cfg: Config):
    o, lse = _forward(*_fold(q, k, v, mask, cfg), cfg, save_lse=True)
    # Residuals keep the caller's q, k, v (alive anyway), not the folded copies.
    return _unfold_rows(o, q.shape[1], q.shape[2]), (q, k, v, mask, o, lse)


def _attend_bwd(cfg: Config, res, do):
    q, k, v, mask, o, lse = res
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qf, kf, vf, m = _fold(q, k, v, mask, cfg)
    dof = _fold_rows(do, kh, qf.shape[2] - t * (n // kh))
    dq, dk, dv = _backward(qf, kf, vf, m, o, lse, dof, cfg)
    dk, dv = (x[:, :, :s].transpose(0, 2, 1, 3) for x in (dk, dv))
    return _unfold_rows(dq, t, n), dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- public


def flash_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
    device_kind: str | None = None,
) -> jax.Array:
    """Mosaic flash attention: ``q [b,t,n,h]``, ``k, v [b,s,kh,h]`` and a
    :class:`~kvshare_jax.masks.Mask` (int32 arrays) -> ``[b,t,n,h]`` in ``q.dtype``;
    differentiable in q, k, v.

    Inputs are validated by :func:`kvshare_jax.kernels.flash_attention`, the public
    entry point. ``block_q`` counts folded query rows (``t * n // kh`` in all),
    ``block_k`` keys; defaults by ``device_kind`` (:func:`block_sizes`).
    ``interpret=True`` runs the kernels in the TPU interpreter
    (``pltpu.InterpretParams``) on any backend.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = block_sizes(t * (n // kh), s, h, q.dtype, device_kind, block_q, block_k)
    return _jit_attend(q, k, v, mask, _config(h, mask, bq, bk, interpret))


def cache_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    block_k: int | None = None,
    interpret: bool = False,
    device_kind: str | None = None,
    scales: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Decode attention over time-minor cache slots, read in place: ``q [b,t,n,h]``,
    ``k, v [b,kh,h,S]`` and a mask of ``q_pos [b,t]``, ``kv_pos [b,S]`` (segment ids
    alike) -> ``[b,t,n,h]`` (inference only: no gradient). Quantized slots (int8, fp8)
    come with ``scales = (k_scale, v_scale)``, ``[b,kh,S]`` fp32 each, tiled beside the
    slots and applied in VMEM. ``block_k`` keys per tile (default: :func:`decode_block`);
    a cache whose length no tile divides is padded, a copy that
    :func:`kvshare_jax.cache_layout.cache_length` avoids."""
    b, t, n, h = q.shape
    kh, s = k.shape[1], k.shape[3]
    bk = decode_block(s, kh, h, q.dtype, device_kind, block_k)
    if s % bk:
        pad = round_up(s, bk) - s
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (k, v))
        if scales is not None:
            scales = tuple(jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in scales)
        kv_pos = jnp.pad(mask.kv_pos, ((0, 0), (0, pad)), constant_values=INVALID_POS)
        kv_seg = None if mask.kv_seg is None else jnp.pad(mask.kv_seg, ((0, 0), (0, pad)))
        mask = mask.replace(kv_pos=kv_pos, kv_seg=kv_seg)
    cfg = _config(h, mask, t * (n // kh), bk, interpret)
    cfg = dataclasses.replace(cfg, quantized=scales is not None)
    return _jit_cache(q, k, v, mask, cfg, scales)


@functools.partial(jax.jit, static_argnums=(4,))
def _jit_cache(q, k, v, mask: Mask, cfg: Config, scales=None) -> jax.Array:
    return _cache_decode(q, k, v, mask, cfg, scales)


@functools.partial(jax.jit, static_argnums=(4,))
def _jit_attend(q, k, v, mask: Mask, cfg: Config) -> jax.Array:
    return _attend(q, k, v, mask, cfg)
