"""Cached autoregressive decoding: prefill + ``lax.scan`` over new tokens, one program.

Shapes: b batch, t prompt width, S cache length, k KV heads, h head dim, v vocabulary,
n new tokens.

**Prompts are right-padded**: ``prompts [b,t]`` holds sequence ``i`` in
``prompts[i, :lengths[i]]`` at positions ``0..lengths[i]-1``; what follows is ignored.

**Cache**: one slot per KV layer (``layout.kv_layers`` order; layer ``i`` reads slot
``layout.slot_of_layer[i]``), each a preallocated K and V buffer of rows ``[b*k, S, h]``
(sequence i's KV head j is row ``i*k + j``: heads before time and no degenerate
dimension, so the decode-step attention contracts the buffer as stored), plus
``pos [b]``, the number of positions written per sequence = its next write position.
A layout with ``l`` KV layers has exactly ``l / L`` of the cache bytes of a standard
transformer. Sliding-window layers keep full-length slots (no ring buffer).

**Exactness** (docs/design.md §5): a decode step runs the new token through all layers bottom
to top; a KV layer writes its K/V at ``pos`` before attending, so a layer reading a
target at or below it sees positions ``<= pos`` and a layer reading an upward target
sees positions ``< pos`` (the target has not run yet for this token). Prefill is the
iterative parallel forward on the prompt; the cache receives the final iteration's KVs,
exact when the cyclic blocks ran at least ``t`` passes (``prefill_passes``). Cache
entries past a sequence's ``pos`` (its prompt padding, say) are never attended: the
causal mask hides them until decoding overwrites them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax.model import (
    ModelConfig,
    Params,
    Passes,
    Runner,
    check_prefill_passes,
    check_tol,
    forward_hidden,
)
from kvshare_jax.sampling import GREEDY, Sampling, sample

# Prefill iteration of cyclic blocks unless told otherwise: "auto" iterates until the upward
# KVs change by at most DEFAULT_PREFILL_TOL between passes (at most t passes, which is
# exact), so it stops early where the KVs converge; on every measured layout and prompt it
# was far more exact than the former fixed 7 + 2 passes ("exact", t passes, costs up to
# 25x standard's prefill at t = 128). README "Generation speed",
# experiments/results/adaptive_prefill_cpu.md.
DEFAULT_PREFILL_PASSES: Passes = "auto"
DEFAULT_PREFILL_TOL = 1e-4  # max abs change of the upward KVs at which "auto" stops


class KVCache(NamedTuple):
    """Preallocated KV cache (a pytree; donate it to the jitted program)."""

    k: tuple[jax.Array, ...]  # per slot: rows [b*k, S, h]
    v: tuple[jax.Array, ...]  # per slot: rows [b*k, S, h]
    pos: jax.Array  # [b] int32: positions written = next write position


class GenerateOutput(NamedTuple):
    """Generated tokens; ``tokens[i, :lengths[i]]`` is sequence ``i``'s continuation."""

    tokens: jax.Array  # [b, n] int32, pad_id after a stop token
    lengths: jax.Array  # [b] int32: tokens up to and including the first stop token
    logits: jax.Array | None  # [b, n, v] fp32 logits of every step (return_logits)


# ----------------------------------------------------------------- the cache
def _slot_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, int, int]:
    return (batch * cfg.num_kv_heads, max_len, cfg.hd)


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
    """Bytes of the K and V buffers (``pos`` excluded): ``2 l b k S h`` x itemsize."""
    per_slot = int(np.prod(_slot_shape(cfg, batch, max_len))) * jnp.dtype(cfg.dtype).itemsize
    return 2 * cfg.layout.num_kv_layers * per_slot


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache of ``max_len`` positions for ``batch`` sequences."""
    shape, dtype = _slot_shape(cfg, batch, max_len), jnp.dtype(cfg.dtype)
    slots = cfg.layout.num_kv_layers
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(slots)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(slots)),
        pos=jnp.zeros((batch,), jnp.int32),
    )


def cache_report(cfg: ModelConfig, batch: int, max_len: int) -> str:
    """A few lines on the cache of ``cfg``: slots, layer -> slot map, bytes vs standard."""
    layout = cfg.layout
    (_, s, h), b, k = _slot_shape(cfg, batch, max_len), batch, cfg.num_kv_heads
    total = cache_bytes(cfg, batch, max_len)
    standard = total // layout.num_kv_layers * layout.num_layers
    return "\n".join(
        [
            f"kv cache: {layout.num_kv_layers} slots (KV layers "
            f"{' '.join(map(str, layout.kv_layers))}) x K,V of [b*k={b}*{k}, S={s}, h={h}] "
            f"{jnp.dtype(cfg.dtype).name}",
            f"layer -> slot: {' '.join(map(str, layout.slot_of_layer))}",
            f"bytes: {total:,} = {layout.num_kv_layers}/{layout.num_layers} of standard "
            f"({standard:,}), ratio {total / standard:.4f}",
            "sliding-window layers: full-length slots (no ring buffer)",
        ]
    )


def _write_prompt(buf: jax.Array, new: jax.Array) -> jax.Array:
    """Writes prompt KVs ``new [b,t,k,h]`` at positions ``0..t-1`` of ``buf [b*k,S,h]``."""
    b, t, k, h = new.shape
    rows = jnp.swapaxes(new, 1, 2).reshape(b * k, t, h)
    return jax.lax.dynamic_update_slice(buf, rows.astype(buf.dtype), (0, 0, 0))


def _write_token(buf: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """Writes one token's KVs ``new [b,1,k,h]`` at per-sequence positions ``pos [b]``."""
    b, _, k, h = new.shape
    rows = jnp.arange(b * k)
    return buf.at[rows, jnp.repeat(pos, k)].set(new.reshape(b * k, h).astype(buf.dtype))


# --------------------------------------------------------- step-by-step API
def prefill(
    cfg: ModelConfig,
    params: Params,
    cache: KVCache,
    prompts: jax.Array,
    lengths: jax.Array,
    *,
    passes: Passes | None = None,
    tol: float = 0.0,
    all_logits: bool = False,
    return_passes: bool = False,
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
    """Runs the right-padded ``prompts [b,t]`` through the model once and fills the cache.

    Returns the logits at each sequence's last prompt token ``[b,v]`` (all prompt logits
    ``[b,t,v]`` with ``all_logits``) and the cache with ``pos = lengths``; with
    ``return_passes`` also the passes the cyclic blocks ran (int32 scalar). ``passes``:
    ``(m, b)`` iteration counts of cyclic blocks, ``"auto"`` (until the upward KVs change
    by at most ``tol``, at most ``t`` passes), ``"exact"`` (until they stop changing, at
    most ``t``: exact), or None for `DEFAULT_PREFILL_PASSES`.
    """
    if passes is None:
        passes = DEFAULT_PREFILL_PASSES
    b, t = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < lengths[:, None]
    prompts = jnp.where(valid, prompts, 0)  # padding may hold any id (-1, say)
    x, kv, ran = forward_hidden(
        cfg, params, prompts, positions, valid, passes=passes, tol=tol, return_passes=True
    )
    if not all_logits:
        x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [b, 1, d]
    logits = Runner(cfg, params).logits(x)
    layers = cfg.layout.kv_layers
    cache = KVCache(
        k=tuple(_write_prompt(buf, kv[j][0]) for buf, j in zip(cache.k, layers, strict=True)),
        v=tuple(_write_prompt(buf, kv[j][1]) for buf, j in zip(cache.v, layers, strict=True)),
        pos=lengths.astype(jnp.int32),
    )
    logits = logits if all_logits else logits[:, 0]
    return (logits, cache, ran) if return_passes else (logits, cache)


def decode_step(
    cfg: ModelConfig, params: Params, cache: KVCache, tokens: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Feeds ``tokens [b]`` at positions ``cache.pos`` -> next-token logits ``[b,v]``.

    Layers run bottom to top; each KV layer writes its K/V into its slot before any
    layer reads it, and masks by position give exactly the sequential semantics. The
    caller keeps ``cache.pos`` below the cache length (`generate` sizes it so).
    """
    run = Runner(cfg, params)
    b, s = tokens.shape[0], cache.k[0].shape[1]
    q_pos = cache.pos[:, None]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    ks, vs = list(cache.k), list(cache.v)
    x = run.embed(tokens[:, None])
    for i, slot in enumerate(cfg.layout.slot_of_layer):
        q, own = run.qkv(i, x, q_pos)
        if own is not None:
            ks[slot] = _write_token(ks[slot], own[0], cache.pos)
            vs[slot] = _write_token(vs[slot], own[1], cache.pos)
        attn = run.attend(i, q, (ks[slot], vs[slot]), q_pos, kv_pos, rows=True)
        x = run.finish(i, x, attn)
    return run.logits(x)[:, 0], KVCache(tuple(ks), tuple(vs), cache.pos + 1)


# ------------------------------------------------------------ the program
@functools.lru_cache(maxsize=64)
def generate_fn(
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    prefill_passes: Passes | None = None,
    prefill_tol: float = DEFAULT_PREFILL_TOL,
    return_logits: bool = False,
) -> Callable[..., tuple[GenerateOutput, KVCache]]:
    """The jitted generation program ``(params, cache, prompts, lengths, rng)`` ->
    ``(GenerateOutput, cache)``: prefill, then a ``lax.scan`` of ``max_new_tokens - 1``
    decode steps. The cache (length ``>= t + max_new_tokens - 1``) is donated.

    Sequences that emitted a stop token keep running (static shapes, no early exit)
    but emit ``pad_id`` and stop counting towards their length.
    """
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def emit(logits, rng, step, finished, count):
        tok = sample(logits, jax.random.fold_in(rng, step), sampling)
        tok = jnp.where(finished, pad_id, tok)
        count = count + (~finished).astype(jnp.int32)
        if stop_tokens:
            finished = finished | jnp.isin(tok, stops)
        return tok, finished, count

    def program(params, cache, prompts, lengths, rng):
        b = prompts.shape[0]
        logits, cache = prefill(
            cfg, params, cache, prompts, lengths, passes=prefill_passes, tol=prefill_tol
        )
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

    return jax.jit(program, donate_argnums=1)


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
    prefill_passes: Passes | None = None,
    prefill_tol: float = DEFAULT_PREFILL_TOL,
    return_logits: bool = False,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after each right-padded prompt.

    ``prompts [b,t]`` with ``lengths [b]`` (default: all ``t``); ``rng`` is a
    ``jax.random.key`` (only sampling uses it); ``stop_tokens`` end a sequence (it then
    emits ``pad_id``). ``prefill_passes``: ``(m, b)`` iteration counts of the prompt's
    cyclic blocks (``m + b >= t`` is exact), ``"auto"`` (until the upward KVs change by at
    most ``prefill_tol``) or ``"exact"``; default `DEFAULT_PREFILL_PASSES`.
    """
    prompts, lengths = check_request(cfg, prompts, lengths, max_new_tokens)
    for tok in (*stop_tokens, pad_id):
        if not 0 <= tok < cfg.vocab_size:
            raise ValueError(f"token id {tok} is out of the vocabulary [0, {cfg.vocab_size})")
    if prefill_passes is not None:
        prefill_passes = check_prefill_passes(prefill_passes, "prefill_passes")
    prefill_tol = check_tol(prefill_tol, "prefill_tol")
    fn = generate_fn(
        cfg,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_tokens=tuple(int(s) for s in stop_tokens),
        pad_id=pad_id,
        prefill_passes=prefill_passes,
        prefill_tol=prefill_tol,
        return_logits=return_logits,
    )
    cache = init_cache(cfg, prompts.shape[0], prompts.shape[1] + max_new_tokens - 1)
    rng = jax.random.key(0) if rng is None else rng
    out, _ = fn(params, cache, jnp.asarray(prompts), jnp.asarray(lengths), rng)
    return out
