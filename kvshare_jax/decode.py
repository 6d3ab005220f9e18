"""Cached autoregressive decoding: prefill + ``lax.scan`` over new tokens, one program.

Shapes: b batch, t prompt width, S cache length, k KV heads, h head dim, v vocabulary,
n new tokens.

**Prompts are right-padded**: ``prompts [b,t]`` holds sequence ``i`` in
``prompts[i, :lengths[i]]`` at positions ``0..lengths[i]-1``; what follows is ignored.

**Cache**: one slot per KV layer (``layout.kv_layers`` order; layer ``i`` reads slot
``layout.slot_of_layer[i]``), each a preallocated K and V buffer laid out per target
(:mod:`kvshare_jax.cache_layout`: rows ``[b*k, S, h]`` on CPU/GPU, ``[b*k, h, S]`` on
TPU; sequence i's KV head j is row ``i*k + j``), read and written in place. Every
sequence writes a step at the same cache ``index``; ``kv_pos [b, S]`` holds the position
stored at each index (``INVALID_POS`` for unwritten indices and prompt padding), and
``pos [b]`` is each sequence's next position. A layout with ``l`` KV layers has exactly
``l / L`` of the cache bytes of a standard transformer. Sliding-window layers keep
full-length slots (no ring buffer). With ``model.kv_cache_dtype`` int8 or fp8 the slots
hold quantized K/V and each slot has fp32 scales ``[b*k, S]`` beside it
(:mod:`kvshare_jax.kv_quant`), written in place with it (:func:`write_kv`).

**Exactness** (docs/design.md §5): a decode step runs the new token through all layers bottom
to top; a KV layer writes its K/V at ``pos`` before attending, so a layer reading a
target at or below it sees positions ``<= pos`` and a layer reading an upward target
sees positions ``< pos`` (the target has not run yet for this token: its entry at
``index`` is masked by position until then). Prefill is the
iterative parallel forward on the prompt; the cache receives the final iteration's KVs,
exact when the cyclic blocks ran at least ``t`` passes (:mod:`kvshare_jax.prefill`). Prompt
padding keeps ``INVALID_POS`` and is never attended.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax import cache_layout, kv_quant
from kvshare_jax.cache_layout import SlotLayout
from kvshare_jax.masks import INVALID_POS, Mask, segment_positions
from kvshare_jax.model import BoundModel, ModelConfig, Params, forward_hidden
from kvshare_jax.prefill import DEFAULT as DEFAULT_PREFILL
from kvshare_jax.prefill import Passes, Prefill
from kvshare_jax.sampling import GREEDY, Sampling, sample
from kvshare_jax.target import inference_compiler_options

PREFILL_TOKENS = 2048  # prompt tokens per prefill pass of the generation program


@flax.struct.dataclass
class KVCache:
    """Preallocated KV cache (a pytree; donate it to the jitted program)."""

    k: tuple[jax.Array, ...]  # per slot: [b*k, S, h] (SH) or [b*k, h, S] (HS)
    v: tuple[jax.Array, ...]  # like k
    kv_pos: jax.Array  # [b, S] int32: position held at each cache index (INVALID_POS: none)
    pos: jax.Array  # [b] int32: next position per sequence
    index: jax.Array  # [] int32: next cache index, the same for every sequence
    layout: SlotLayout = flax.struct.field(pytree_node=False, default="SH")
    # Packed prompts only (None otherwise: the program has no segment inputs at all):
    kv_seg: jax.Array | None = None  # [b, S] int32: segment id held at each cache index
    seg: jax.Array | None = None  # [b] int32: segment of the decoded tokens (the last one)
    # Quantized caches only (model.kv_cache_dtype, kv_quant; () otherwise): per slot
    k_scale: tuple[jax.Array, ...] = ()  # [b*k, S] fp32: the scale of each row and index
    v_scale: tuple[jax.Array, ...] = ()  # like k_scale

    @property
    def buffers(self) -> Buffers:
        """``(k, v, k_scale, v_scale)``: what a write updates (:func:`write_kv`)."""
        return self.k, self.v, self.k_scale, self.v_scale

    @property
    def length(self) -> int:
        """Cache positions ``S``."""
        return self.kv_pos.shape[1]


Buffers = tuple[tuple[jax.Array, ...], ...]  # (k, v, k_scale, v_scale) slot tuples


class GenerateOutput(NamedTuple):
    """Generated tokens; ``tokens[i, :lengths[i]]`` is sequence ``i``'s continuation."""

    tokens: jax.Array  # [b, n] int32, pad_id after a stop token
    lengths: jax.Array  # [b] int32: tokens up to and including the first stop token
    logits: jax.Array | None  # [b, n, v] fp32 logits of every step (return_logits)


# ----------------------------------------------------------------- the cache
def slot_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype of the K/V slots: ``model.kv_cache_dtype`` if quantized, else ``dtype``."""
    return kv_quant.storage_dtype(cfg.kv_cache_dtype, cfg.dtype)


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
    """Bytes of the K and V buffers and, quantized, their scales (positions excluded):
    ``2 l b k S (h x itemsize + scale bytes)``."""
    row = cfg.hd * slot_dtype(cfg).itemsize
    if kv_quant.quantized(cfg.kv_cache_dtype):
        row += jnp.dtype(kv_quant.SCALE_DTYPE).itemsize
    return 2 * cfg.layout.num_kv_layers * batch * cfg.num_kv_heads * max_len * row


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    platform: str | None = None,
    *,
    segments: bool = False,
) -> KVCache:
    """An empty cache of at least ``max_len`` positions for ``batch`` sequences, laid out
    for ``platform`` (None: the target; :func:`cache_layout.cache_length` rounds the
    length up to whole 128-position tiles on accelerators). ``segments``: the cache also
    holds segment ids, for prompts that pack several documents (`prefill`'s
    ``segment_ids``)."""
    layout = cache_layout.for_target(platform)
    length = cache_layout.cache_length(max_len, platform)
    shape = cache_layout.slot_shape(layout, batch * cfg.num_kv_heads, length, cfg.hd)
    dtype, slots = slot_dtype(cfg), cfg.layout.num_kv_layers
    scales = slots if kv_quant.quantized(cfg.kv_cache_dtype) else 0

    def scale_slots():  # distinct buffers (a donated cache has no aliases)
        return tuple(jnp.zeros((shape[0], length), kv_quant.SCALE_DTYPE) for _ in range(scales))

    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(slots)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(slots)),
        kv_pos=jnp.full((batch, length), INVALID_POS, jnp.int32),
        pos=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        layout=layout,
        kv_seg=jnp.zeros((batch, length), jnp.int32) if segments else None,
        seg=jnp.zeros((batch,), jnp.int32) if segments else None,
        k_scale=scale_slots(),
        v_scale=scale_slots(),
    )


def write_kv(
    cfg: ModelConfig, layout: SlotLayout, bufs: Buffers, slot: int, kv, index, row=0
) -> Buffers:
    """``bufs`` with slot ``slot`` holding the time-major ``kv = (k, v) [c, t, k, h]`` at
    indices ``index ..``, rows ``row ..``, in place; a quantized cache stores them
    quantized (:func:`kv_quant.quantize`) with their scales beside them."""
    k, v, k_scale, v_scale = (list(x) for x in bufs)
    if k_scale:
        (qk, sk), (qv, sv) = (kv_quant.quantize(x, cfg.kv_cache_dtype) for x in kv)
        k_scale[slot] = cache_layout.write_scale(k_scale[slot], sk, index, row)
        v_scale[slot] = cache_layout.write_scale(v_scale[slot], sv, index, row)
        kv = (qk, qv)
    k[slot] = cache_layout.write(layout, k[slot], kv[0], index, row)
    v[slot] = cache_layout.write(layout, v[slot], kv[1], index, row)
    return tuple(k), tuple(v), tuple(k_scale), tuple(v_scale)


def cache_report(cfg: ModelConfig, batch: int, max_len: int) -> str:
    """A few lines on the cache of ``cfg``: slots, layer -> slot map, bytes vs standard."""
    layout = cfg.layout
    b, k, s, h = batch, cfg.num_kv_heads, max_len, cfg.hd
    total = cache_bytes(cfg, batch, max_len)
    standard = total // layout.num_kv_layers * layout.num_layers
    return "\n".join(
        [
            f"kv cache: {layout.num_kv_layers} slots (KV layers "
            f"{' '.join(map(str, layout.kv_layers))}) x K,V of rows b*k={b}*{k} x "
            f"S={s} x h={h} {slot_dtype(cfg).name}"
            + (" + fp32 scales [b*k, S]" if kv_quant.quantized(cfg.kv_cache_dtype) else ""),
            f"layer -> slot: {' '.join(map(str, layout.slot_of_layer))}",
            f"bytes: {total:,} = {layout.num_kv_layers}/{layout.num_layers} of standard "
            f"({standard:,}), ratio {total / standard:.4f}",
            "sliding-window layers: full-length slots (no ring buffer)",
        ]
    )


def inference_params(cfg: ModelConfig, params: Params) -> Params:
    """``params`` with every matrix cast to the compute dtype once, as the layers cast
    them on every use (same results); vectors (norm scales) keep their dtype. Pass these
    to the generation program: otherwise XLA hoists the casts out of the decode loop into
    a temporary copy of the weights (on TPU the whole weights, at every batch size)."""
    dtype = jnp.dtype(cfg.dtype)

    def cast(x):
        if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, params)


# --------------------------------------------------------- step-by-step API
def prefill(
    cfg: ModelConfig,
    params: Params,
    cache: KVCache,
    prompts: jax.Array,
    lengths: jax.Array,
    *,
    passes: Passes = "auto",
    tol: float = 0.0,
    all_logits: bool = False,
    return_passes: bool = False,
    chunk: int | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
    """Runs the right-padded ``prompts [b,t]`` through the model once and fills the cache.

    Returns the logits at each sequence's last prompt token ``[b,v]`` (all prompt logits
    ``[b,t,v]`` with ``all_logits``) and the cache with ``pos = lengths``; with
    ``return_passes`` also the passes the cyclic blocks ran (int32 scalar). ``passes``:
    ``(m, b)`` iteration counts of cyclic blocks, ``"auto"`` (until the upward KVs change
    by at most ``tol``, at most ``t`` passes) or ``"exact"`` (until they stop changing, at
    most ``t``: exact); `Prefill.iteration` gives both. ``chunk``: sequences per
    forward pass (a loop over groups of the batch, each written into the cache in place,
    so the activations held are those of ``chunk`` prompts; None: the whole batch). With
    ``"auto"`` a group converges on its own sequences.

    ``segment_ids [b,t]`` (a cache from ``init_cache(..., segments=True)``): each prompt
    packs several documents (docs/design.md §2): positions restart at 0 in every
    segment, no token attends across segments, and decoding continues the prompt's last
    segment (``cache.seg``), so it gives that document's results as if it ran alone.
    """
    b, t = prompts.shape
    if segment_ids is not None and cache.kv_seg is None:
        raise ValueError("segment_ids need a cache with segments (init_cache(segments=True))")
    if segment_ids is None and cache.kv_seg is not None:
        segment_ids = jnp.zeros((b, t), jnp.int32)  # one segment per prompt
    c = b if chunk is None else max(1, min(int(chunk), b))
    v = cfg.vocab_size
    logits = jnp.zeros((b, t, v) if all_logits else (b, v), jnp.float32)
    state = (cache.buffers, cache.kv_pos, logits, jnp.int32(0))
    if segment_ids is not None:  # also the segments' ids and each sequence's continuation
        state += (cache.kv_seg, lengths.astype(jnp.int32), cache.seg)

    def group(i, state):  # sequences start .. start+c-1 (the last group may overlap)
        bufs, kv_pos, logits, ran = state[:4]
        start = jnp.minimum(i * c, b - c)
        rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=c)
        segs = None if segment_ids is None else rows(segment_ids).astype(jnp.int32)
        out, kv, written, nxt, n = _prefill_rows(cfg, params, rows(prompts), rows(lengths),
                                                 segs, passes, tol, all_logits)  # fmt: skip
        at = start * cfg.num_kv_heads
        for slot, j in enumerate(cfg.layout.kv_layers):
            bufs = write_kv(cfg, cache.layout, bufs, slot, kv[j], 0, at)
        kv_pos = jax.lax.dynamic_update_slice(kv_pos, written, (start, 0))
        logits = jax.lax.dynamic_update_slice_in_dim(logits, out, start, 0)
        new = (bufs, kv_pos, logits, jnp.maximum(ran, n))
        if segs is None:
            return new
        kv_seg, pos, seg = state[4:]
        return new + (
            jax.lax.dynamic_update_slice(kv_seg, segs, (start, 0)),
            jax.lax.dynamic_update_slice(pos, nxt[0], (start,)),
            jax.lax.dynamic_update_slice(seg, nxt[1], (start,)),
        )

    groups = -(-b // c)
    state = group(0, state) if groups == 1 else jax.lax.fori_loop(0, groups, group, state)
    (ks, vs, k_scale, v_scale), kv_pos, logits, ran = state[:4]
    kv_seg, pos, seg = state[4:] if segment_ids is not None else (None, lengths, None)
    cache = cache.replace(
        k=ks, v=vs, k_scale=k_scale, v_scale=v_scale, kv_pos=kv_pos, pos=pos.astype(jnp.int32),
        index=jnp.int32(t), kv_seg=kv_seg, seg=seg,
    )  # fmt: skip
    return (logits, cache, ran) if return_passes else (logits, cache)


def _prefill_rows(cfg, params, prompts, lengths, segs, passes, tol, all_logits):
    """The prefill forward of some sequences: logits (``[c,v]``, or ``[c,t,v]``), the KVs
    of every KV layer (time-major), the positions they hold (``INVALID_POS`` for padding),
    with segment ids ``segs`` the next position and segment of each sequence (its last
    segment continues; else None), and the passes run."""
    c, t = prompts.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (c, t))
    valid = index < lengths[:, None]
    positions = index if segs is None else segment_positions(segs)
    prompts = jnp.where(valid, prompts, 0)  # padding may hold any id (-1, say)
    x, kv, ran = forward_hidden(
        cfg, params, prompts, positions, valid, segment_ids=segs, passes=passes, tol=tol,
        return_passes=True,
    )  # fmt: skip
    last = (lengths - 1)[:, None]
    if not all_logits:
        x = jnp.take_along_axis(x, last[:, :, None], axis=1)  # [c, 1, d]
    logits = BoundModel(cfg, params).logits(x)
    logits = logits if all_logits else logits[:, 0]
    nxt = None
    if segs is not None:
        nxt = (jnp.take_along_axis(positions, last, 1)[:, 0] + 1,
               jnp.take_along_axis(segs, last, 1)[:, 0])  # fmt: skip
    return logits, kv, jnp.where(valid, positions, INVALID_POS), nxt, ran


def decode_step(
    cfg: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Feeds ``tokens [b]`` at positions ``cache.pos`` -> next-token logits ``[b,v]``.

    Layers run bottom to top; each KV layer writes its K/V into its slot at
    ``cache.index`` (in place) before any layer reads it, and masks by position give
    exactly the sequential semantics. The caller keeps ``cache.index`` below the cache
    length (`generate` sizes it so).
    """
    bound = BoundModel(cfg, params)
    q_pos, at, lay = cache.pos[:, None], cache.index, cache.layout
    kv_pos = jax.lax.dynamic_update_slice(cache.kv_pos, q_pos, (0, at))
    q_seg = kv_seg = None
    if cache.kv_seg is not None:  # packed prompts: the tokens continue the last segment
        q_seg = cache.seg[:, None]
        kv_seg = jax.lax.dynamic_update_slice(cache.kv_seg, q_seg, (0, at))
    mask = Mask(q_pos, kv_pos, q_seg, kv_seg)
    bufs = cache.buffers
    x = bound.embed(tokens[:, None])
    for i, slot in enumerate(cfg.layout.slot_of_layer):
        q, own = bound.qkv(i, x, q_pos)
        if own is not None:
            bufs = write_kv(cfg, lay, bufs, slot, own, at)
        k, v, k_scale, v_scale = (buf[slot] if buf else None for buf in bufs)
        scales = None if k_scale is None else (k_scale, v_scale)
        attn = bound.attend(i, q, (k, v), mask, cache=lay, scales=scales)
        x = bound.finish(i, x, attn)
    ks, vs, k_scale, v_scale = bufs
    out = cache.replace(
        k=ks, v=vs, k_scale=k_scale, v_scale=v_scale, kv_pos=kv_pos, pos=cache.pos + 1,
        index=at + 1, kv_seg=kv_seg,
    )  # fmt: skip
    return bound.logits(x)[:, 0], out


# ------------------------------------------------------------ the program
@functools.lru_cache(maxsize=64)
def generate_fn(
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    prefill_settings: Prefill = DEFAULT_PREFILL,
    return_logits: bool = False,
    prefill_tokens: int = PREFILL_TOKENS,
) -> Callable[..., tuple[GenerateOutput, KVCache]]:
    """The jitted generation program ``(params, cache, prompts, lengths, rng)`` ->
    ``(GenerateOutput, cache)``: prefill, then a ``lax.scan`` of ``max_new_tokens - 1``
    decode steps. The cache (length ``>= t + max_new_tokens - 1``) is donated; pass the
    params through `inference_params`. An optional ``segment_ids [b,t]`` (with a cache
    of ``init_cache(segments=True)``) packs documents into a prompt (`prefill`); without
    it the program is the one of plain prompts.

    Prefill runs groups of ``max(1, prefill_tokens // t)`` prompts at a time on one
    device (`prefill`'s ``chunk``), so its activations stay a small part of the program's
    memory at large batches; under a multi-device mesh the batch is prefilled at once.
    ``prefill_settings``: how prefill iterates the cyclic blocks (:class:`Prefill`).

    Sequences that emitted a stop token keep running (static shapes, no early exit)
    but emit ``pad_id`` and stop counting towards their length.
    """
    stops = jnp.asarray(stop_tokens, jnp.int32)
    iteration = prefill_settings.iteration()

    def emit(logits, rng, step, finished, count):
        tok = sample(logits, jax.random.fold_in(rng, step), sampling)
        tok = jnp.where(finished, pad_id, tok)
        count = count + (~finished).astype(jnp.int32)
        if stop_tokens:
            finished = finished | jnp.isin(tok, stops)
        return tok, finished, count

    def program(params, cache, prompts, lengths, rng, segment_ids=None):
        b, t = prompts.shape
        chunk = None if jax.sharding.get_abstract_mesh().size > 1 else prefill_tokens // t
        logits, cache = prefill(
            cfg, params, cache, prompts, lengths, **iteration, chunk=chunk,
            segment_ids=segment_ids,
        )  # fmt: skip
        first = emit(logits, rng, 0, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))

        def body(carry, step):
            cache, tok, finished, count = carry
            logits, cache = decode_step(cfg, params, cache, tok)
            tok, finished, count = emit(logits, rng, step, finished, count)
            return (cache, tok, finished, count), (tok, logits if return_logits else None)

        steps = jnp.arange(1, max_new_tokens)
        (cache, _, _, count), (toks, step_logits) = jax.lax.scan(body, (cache, *first), steps)
        tokens = jnp.concatenate([first[0][:, None], toks.T], axis=1)
        if return_logits:
            step_logits = jnp.concatenate([logits[:, None], jnp.swapaxes(step_logits, 0, 1)], 1)
        return GenerateOutput(tokens, count, step_logits), cache

    return jax.jit(program, donate_argnums=1, compiler_options=inference_compiler_options())


def check_request(
    cfg: ModelConfig,
    prompts: np.ndarray | jax.Array | Sequence[Sequence[int]],
    lengths: np.ndarray | jax.Array | Sequence[int] | None,
    max_new_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Validates a request on the host; returns int32 ``prompts [b,t]`` (trimmed to the
    longest prompt) and ``lengths [b]``. Raises ``ValueError`` with a one-line reason."""
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts must be a [batch, time] array, got shape {prompts.shape}")
    if prompts.shape[1] == 0:
        raise ValueError("empty prompt: a prompt needs at least one token")
    if not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must hold integer token ids, got {prompts.dtype}")
    t = prompts.shape[1]
    lengths = np.full(prompts.shape[0], t) if lengths is None else np.asarray(lengths)
    if lengths.shape != prompts.shape[:1]:
        raise ValueError(f"lengths has shape {lengths.shape}, expected ({prompts.shape[0]},)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, n in enumerate(lengths.tolist()):
        if n < 1:
            raise ValueError(f"empty prompt: sequence {i} has no tokens")
        if n > t:
            raise ValueError(f"sequence {i}: length {n} exceeds the prompt width {t}")
        if n + max_new_tokens > cfg.max_len:
            raise ValueError(
                f"sequence {i}: prompt of {n} tokens + {max_new_tokens} new tokens exceeds "
                f"the model context of {cfg.max_len} tokens"
            )
        bad = [int(x) for x in prompts[i, :n] if not 0 <= x < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"sequence {i}: token id {bad[0]} is out of the vocabulary [0, {cfg.vocab_size})"
            )
    width = int(lengths.max())
    return prompts[:, :width].astype(np.int32), lengths.astype(np.int32)


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: np.ndarray | jax.Array | Sequence[Sequence[int]],
    lengths: np.ndarray | jax.Array | Sequence[int] | None = None,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    rng: jax.Array | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    prefill_settings: Prefill = DEFAULT_PREFILL,
    return_logits: bool = False,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after each right-padded prompt.

    ``prompts [b,t]`` with ``lengths [b]`` (default: all ``t``); ``rng`` is a
    ``jax.random.key`` (only sampling uses it); ``stop_tokens`` end a sequence (it then
    emits ``pad_id``). ``prefill_settings``: how prefill iterates the prompt's cyclic
    blocks (:class:`Prefill`; default ``"auto"``).
    """
    prompts, lengths = check_request(cfg, prompts, lengths, max_new_tokens)
    for tok in (*stop_tokens, pad_id):
        if not 0 <= tok < cfg.vocab_size:
            raise ValueError(f"token id {tok} is out of the vocabulary [0, {cfg.vocab_size})")
    fn = generate_fn(
        cfg,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_tokens=tuple(int(s) for s in stop_tokens),
        pad_id=pad_id,
        prefill_settings=prefill_settings,
        return_logits=return_logits,
    )
    cache = init_cache(cfg, prompts.shape[0], prompts.shape[1] + max_new_tokens - 1)
    rng = jax.random.key(0) if rng is None else rng
    out, _ = fn(
        inference_params(cfg, params), cache, jnp.asarray(prompts), jnp.asarray(lengths), rng
    )
    return out
