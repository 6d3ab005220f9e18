"""Llama-style transformer with cross-layer KV sharing (Flax linen, used functionally).

Shapes: b batch, t time (queries), s time (keys), d model dim, n query heads,
k KV heads, h head dim, v vocabulary.

Each layer is split into two pure pieces so that every execution path (parallel
training/prefill, the sequential reference, the cached decoder) routes KVs the same way:
``layer_qkv`` (norm, Q projection, and K/V projection for KV layers only) and
``layer_finish`` (output projection, residual, SwiGLU MLP). The routing of KVs between
layers lives in the drivers (`forward` here, `sequential_logits`, `decode.py`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kvshare_jax import kv_quant
from kvshare_jax.attention import INVALID_POS, Impl, attention
from kvshare_jax.layout import KVLayout, from_spec, mapping_length
from kvshare_jax.masks import Mask, segment_positions
from kvshare_jax.prefill import Passes, check_passes, check_tol, parse_passes

Params = Any
KV = tuple[jax.Array, jax.Array]  # k, v: [b, s, k, h]
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model description; hashable, so `jit` specialises on it."""

    layout: KVLayout  # layer -> KV target mapping; its length is the number of layers
    vocab_size: int = 32000  # tokens in the vocabulary
    d_model: int = 512  # residual stream width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 8  # KV heads (GQA when < num_heads)
    head_dim: int = 0  # 0 = d_model // num_heads
    d_ff: int = 1376  # SwiGLU hidden width
    max_len: int = 1024  # context length (positions 0..max_len-1)
    forward_passes: int = 7  # m: iterations of a cyclic block without gradient
    backward_passes: int = 2  # b: iterations with gradient
    sliding_window: int = 0  # window W of sliding-window layers (0 = none allowed)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the embedding with the LM head
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype (float32 or bfloat16)
    kv_cache_dtype: str = ""  # decode cache: '' (= dtype), int8 or float8_e4m3fn (kv_quant)
    attention_impl: str = "auto"  # xla | pallas | auto (pallas when built for GPU/TPU)
    matvec_impl: str = "auto"  # xla | auto (single-row fp32 products on CPU: the FFI matvec)
    init_std: float = 0.02  # stddev of the normal initialiser
    remat: bool = False  # rematerialise layers in the backward pass

    def __post_init__(self):
        if isinstance(self.layout, str):
            raise TypeError("layout must be a KVLayout; use ModelConfig.create(layout=str)")
        for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "d_ff", "max_len"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("head_dim", "sliding_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:  # also catches NaN
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in FLOAT_DTYPES:
                raise ValueError(
                    f"{name} must be one of {', '.join(FLOAT_DTYPES)}, got {getattr(self, name)!r}"
                )
        if not self.head_dim and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads}) "
                "unless head_dim is set"
            )
        if self.hd % 2:
            raise ValueError(f"the head dim must be even for RoPE, got {self.hd}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        check_passes((self.forward_passes, self.backward_passes), "forward_passes, backward_passes")
        if any(self.layout.sliding) and self.sliding_window < 1:
            raise ValueError("layout has sliding-window layers but sliding_window is not set")
        kv_quant.check(self.kv_cache_dtype, self.dtype)
        if self.attention_impl not in typing.get_args(Impl):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}")
        if self.matvec_impl not in ("xla", "auto"):
            raise ValueError(f"unknown matvec_impl {self.matvec_impl!r}: expected xla or auto")

    @classmethod
    def create(cls, layout: str | KVLayout, num_layers: int | None = None, **kw) -> ModelConfig:
        """Builds a config from a layout spec string (preset or mapping) or a KVLayout."""
        if isinstance(layout, str):
            if num_layers is None:
                num_layers = mapping_length(layout)
            if num_layers is None:
                raise ValueError(f"layout {layout!r} needs num_layers")
            layout = from_spec(layout, num_layers)
        elif num_layers is not None and num_layers != layout.num_layers:
            raise ValueError(f"layout has {layout.num_layers} layers, expected {num_layers}")
        return cls(layout=layout, **kw)

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def window(self, i: int) -> int | None:
        """Sliding window of layer ``i`` (None = full causal)."""
        return self.sliding_window if self.layout.sliding[i] else None


# ---------------------------------------------------------------- modules
def _init(cfg: ModelConfig, axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=_init(cfg, axes),
        dot_general=_matvec_dot() if cfg.matvec_impl == "auto" else None,
        name=name,
    )


def _matvec_dot() -> Callable:
    """The products of batch-1 decode on CPU: the FFI matvec (kernels/cpu_matvec.py),
    imported when a model first needs it, so importing the model loads no kernel."""
    from kvshare_jax.kernels import cpu_matvec

    return cpu_matvec.dot_general


class RMSNorm(nn.Module):
    eps: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            jnp.dtype(self.param_dtype),
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF half-rotation convention: ``x [b,t,n,h]``, ``pos [b,t]``."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class DecoderLayer(nn.Module):
    """One layer; K/V projections exist only if the layer is a KV layer."""

    cfg: ModelConfig
    index: int

    def setup(self):
        cfg, n, k, h = self.cfg, self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.hd
        self.attn_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        self.q_proj = _dense(cfg, n * h, ("embed", "heads"), "q_proj")
        if cfg.layout.is_kv_layer(self.index):
            self.k_proj = _dense(cfg, k * h, ("embed", "kv_heads"), "k_proj")
            self.v_proj = _dense(cfg, k * h, ("embed", "kv_heads"), "v_proj")
        self.o_proj = _dense(cfg, cfg.d_model, ("heads", "embed"), "o_proj")
        self.mlp_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        self.gate_proj = _dense(cfg, cfg.d_ff, ("embed", "mlp"), "gate_proj")
        self.up_proj = _dense(cfg, cfg.d_ff, ("embed", "mlp"), "up_proj")
        self.down_proj = _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")

    def qkv(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, KV | None]:
        """``x [b,t,d]`` -> ``q [b,t,n,h]`` and this layer's own ``(k, v)`` or None."""
        cfg = self.cfg
        b, t, _ = x.shape
        hx = self.attn_norm(x)
        q = rope(self.q_proj(hx).reshape(b, t, cfg.num_heads, cfg.hd), pos, cfg.rope_theta)
        if not cfg.layout.is_kv_layer(self.index):
            return q, None
        k = self.k_proj(hx).reshape(b, t, cfg.num_kv_heads, cfg.hd)
        v = self.v_proj(hx).reshape(b, t, cfg.num_kv_heads, cfg.hd)
        return q, (rope(k, pos, cfg.rope_theta), v)

    def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Residual update from the attention output ``attn [b,t,n,h]``, then the MLP."""
        b, t, _ = x.shape
        x = x + self.o_proj(attn.reshape(b, t, -1)).astype(x.dtype)
        hx = self.mlp_norm(x)
        y = self.down_proj(nn.silu(self.gate_proj(hx)) * self.up_proj(hx))
        return x + y.astype(x.dtype)


class Transformer(nn.Module):
    """Holds the parameters; the drivers call its methods through ``apply``."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=_init(cfg, ("vocab", "embed")),
        )
        self.layers = [DecoderLayer(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens)

    def layer_qkv(self, i: int, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, KV | None]:
        return self.layers[i].qkv(x, pos)

    def layer_finish(self, i: int, x: jax.Array, attn: jax.Array) -> jax.Array:
        return self.layers[i].finish(x, attn)

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        out = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Touches every parameter once, for ``init`` only: it is not the forward."""
        if not self.is_initializing():
            raise TypeError(
                "Transformer.apply is not the forward (it only creates the parameters): use "
                "model.forward(cfg, params, tokens), or decode.generate_fn to generate"
            )
        x = self.embed_tokens(tokens)
        pos = jnp.zeros(tokens.shape, jnp.int32)
        for i in range(self.cfg.num_layers):
            q, _ = self.layer_qkv(i, x, pos)
            x = self.layer_finish(i, x, q)
        return self.logits(x)


# ----------------------------------------------------------------- params
def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Initialises parameters (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Transformer(cfg).init(rng, tokens))


def param_logical_axes(cfg: ModelConfig) -> Params:
    """A pytree like the params holding ``PartitionSpec``s of logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------- layers
class BoundModel:
    """Binds a config and params to the per-layer pieces (all pure ``apply`` calls)."""

    def __init__(self, cfg: ModelConfig, params: Params):
        self.cfg, self.params, self.module = cfg, params, Transformer(cfg)

    def _apply(self, method: Callable, *args):
        return self.module.apply(self.params, *args, method=method)

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = self._apply(Transformer.embed_tokens, tokens)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def qkv(self, i: int, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, KV | None]:
        return self._apply(Transformer.layer_qkv, i, x, pos)

    def finish(self, i: int, x: jax.Array, attn: jax.Array) -> jax.Array:
        x = self._apply(Transformer.layer_finish, i, x, attn)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        return self._apply(Transformer.logits, x)

    def attend(
        self,
        i: int,
        q: jax.Array,
        kv: KV,
        mask: Mask,
        cache: str | None = None,
        scales: KV | None = None,
    ) -> jax.Array:
        """Attention of layer ``i``'s queries over its target's ``kv`` under ``mask``'s
        positions and segments with layer ``i``'s rule (strict for an upward target, the
        window of a sliding layer); ``cache``: ``kv`` are decode-cache slots in that
        layout, see `cache_layout`, quantized with ``scales`` (K's, V's) if given."""
        mask = mask.rule(strict=self.cfg.layout.is_upward(i), window=self.cfg.window(i))
        return attention(
            q, kv[0], kv[1], mask, impl=self.cfg.attention_impl, cache=cache, scales=scales
        )


# ---------------------------------------------------------------- forward
def _run_layers(
    bound: BoundModel,
    layers: range,
    x: jax.Array,
    mask: Mask,
    done: dict[int, KV],
    prev: dict[int, KV],
) -> tuple[jax.Array, dict[int, KV]]:
    """Runs ``layers`` once. Targets below/at a layer come from ``done`` (updated in
    place order), upward targets from ``prev`` (the previous iteration). Returns the
    output and the KVs computed by these layers."""
    targets = bound.cfg.layout.targets
    new: dict[int, KV] = {}
    for i in layers:
        j = targets[i]
        other = None if j == i else (new[j] if j in new else (prev[j] if j > i else done[j]))
        x, own = _layer(bound.cfg, i)(bound.params, x, mask, other)
        if own is not None:
            new[i] = own
    return x, new


def _layer(cfg: ModelConfig, i: int) -> Callable:
    """Layer ``i`` as a pure function ``(params, x, mask, other_kv) -> (x, own_kv)``
    (RoPE at ``mask.q_pos``; ``other_kv`` is None when the layer reads its own KVs);
    rematerialised in the backward pass when ``cfg.remat``."""

    def layer(params, x, mask, other):
        bound = BoundModel(cfg, params)
        q, own = bound.qkv(i, x, mask.q_pos)
        kv = own if other is None else other
        return bound.finish(i, x, bound.attend(i, q, kv, mask)), own

    return jax.checkpoint(layer) if cfg.remat else layer


def _no_grad_pass(
    bound: BoundModel,
    layers: range,
    x: jax.Array,
    mask: Mask,
    done: dict[int, KV],
) -> Callable[[dict[int, KV]], tuple[jax.Array, dict[int, KV]]]:
    """One pass of ``layers`` from given upward KVs, on stopped inputs and parameters (a
    loop of such passes stores nothing for the backward pass)."""
    sg = jax.lax.stop_gradient
    frozen = BoundModel(bound.cfg, sg(bound.params))
    xs, done_s = sg(x), sg(done)
    return lambda prev: _run_layers(frozen, layers, xs, mask, done_s, prev)


def _iterate_block(
    bound: BoundModel,
    layers: range,
    x: jax.Array,
    mask: Mask,
    done: dict[int, KV],
    passes: Passes,
    init_kv: dict[int, KV],
    tol: float = 0.0,
) -> tuple[jax.Array, dict[int, KV], jax.Array]:
    """Iterative parallel evaluation of a cyclic block (docs/design.md §4).

    ``passes=(m, b)``: ``m`` iterations without gradient (a ``fori_loop`` on stopped
    inputs, so nothing is stored for the backward pass), then ``b`` with gradient.
    ``"auto"`` / ``"exact"``: see `_converge_block`. Upward targets start from ``init_kv``
    where given, else from zeros. Returns the output, the block's KVs and the number of
    passes run (int32 scalar).
    """
    targets = bound.cfg.layout.targets
    upward = sorted({targets[i] for i in layers if targets[i] > i})
    kh, h = bound.cfg.num_kv_heads, bound.cfg.hd
    zero = jnp.zeros((*x.shape[:2], kh, h), x.dtype)
    prev = {j: init_kv.get(j, (zero, zero)) for j in upward}
    if isinstance(passes, str):
        return _converge_block(bound, layers, x, mask, done, prev, tol)
    m, b = passes

    if m > 0:
        no_grad_pass = _no_grad_pass(bound, layers, x, mask, done)

        def body(_, p):
            _, new = no_grad_pass(p)
            return {j: new[j] for j in upward}

        prev = jax.lax.fori_loop(0, m, body, prev)
    out, new = x, {}
    for _ in range(b):
        out, new = _run_layers(bound, layers, x, mask, done, prev)
        prev = {j: new[j] for j in upward}
    return out, new, jnp.int32(m + b)


def _converge_block(
    bound: BoundModel,
    layers: range,
    x: jax.Array,
    mask: Mask,
    done: dict[int, KV],
    prev: dict[int, KV],
    tol: float,
) -> tuple[jax.Array, dict[int, KV], jax.Array]:
    """Iterates a cyclic block in a ``lax.while_loop`` until the upward KVs converge.

    A pass computes the block from the previous pass's upward KVs ``prev``; the loop stops
    after the first pass (at least the config's m + b passes, unless a pass changed
    nothing) whose upward KVs differ from ``prev`` by at most ``tol`` (max abs over K and
    V, every position), or after ``t`` passes: with strict upward masks, pass
    ``n`` is exact at positions ``< n``, so ``t`` passes are exact (docs/design.md §4).
    ``tol = 0`` ("exact") stops only at a fixed point, which is the exact result. Inference
    only: no gradient flows through the loop.
    """
    no_grad_pass = _no_grad_pass(bound, layers, x, mask, done)
    upward = sorted(prev)
    cap = x.shape[1]

    def one_pass(p: dict[int, KV]) -> tuple[jax.Array, dict[int, KV], jax.Array]:
        out, new = no_grad_pass(p)
        change = jnp.zeros((), jnp.float32)
        for j in upward:
            for a, b in zip(new[j], p[j], strict=True):
                diff = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
                change = jnp.maximum(change, jnp.max(diff))
        return out, new, change

    out, new, change = one_pass(jax.lax.stop_gradient(prev))

    # Never fewer passes than the config's fixed m + b (so never less exact than them),
    # unless a pass changes nothing at all: a fixed point is the exact result.
    floor = min(bound.cfg.forward_passes + bound.cfg.backward_passes, cap)

    def cond(carry):
        n, _, _, change = carry
        return (n < cap) & ((change > tol) | ((n < floor) & (change > 0)))

    def body(carry):
        n, _, new, _ = carry
        out, new, change = one_pass({j: new[j] for j in upward})
        return n + 1, out, new, change

    n, out, new, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, new, change))
    return out, new, n


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    valid: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    passes: Passes | None = None,
    init_kv: dict[int, KV] | None = None,
    return_kv: bool = False,
) -> jax.Array | tuple[jax.Array, dict[int, KV]]:
    """Parallel forward: ``tokens [b,t]`` -> logits ``[b,t,v]`` (fp32).

    ``positions [b,t]`` default to ``arange(t)``, or with ``segment_ids [b,t]`` (packed
    documents, docs/design.md §2) to positions restarting at 0 in every segment; a token
    then attends only to its own segment, so each document gets the logits it gets
    alone. ``valid [b,t]`` marks real tokens (keys of invalid tokens are never attended
    to, e.g. padding). ``passes=(m, b)`` overrides the config's iteration counts (or
    ``"auto"`` / ``"exact"``, see `forward_hidden`); ``init_kv`` sets the starting KVs of
    upward targets (default zeros, as in the paper). With ``return_kv`` also returns the
    final KVs of every KV layer, ``{layer: (k, v)}``.
    """
    x, done = forward_hidden(
        cfg, params, tokens, positions, valid, segment_ids=segment_ids, passes=passes,
        init_kv=init_kv,
    )  # fmt: skip
    logits = BoundModel(cfg, params).logits(x)
    return (logits, done) if return_kv else logits


def forward_hidden(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    valid: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    passes: Passes | None = None,
    init_kv: dict[int, KV] | None = None,
    tol: float = 0.0,
    return_passes: bool = False,
) -> tuple[jax.Array, dict[int, KV]] | tuple[jax.Array, dict[int, KV], jax.Array]:
    """`forward` without the LM head: the last layer's output ``[b,t,d]`` (before the
    final norm) and the final KVs of every KV layer. Prefill uses it to project only
    the positions it needs onto the vocabulary.

    ``passes`` may also be ``"auto"`` (iterate each cyclic block until its upward KVs
    change by at most ``tol``, at most ``t`` passes) or ``"exact"`` (``tol = 0``: until
    they stop changing, which is exact); both are inference-only. With
    ``return_passes`` also returns the most passes any cyclic block ran (int32 scalar;
    0 without cyclic blocks).
    """
    b, t = tokens.shape
    mask = token_mask(b, t, positions, valid, segment_ids)
    if passes is None:
        passes = (cfg.forward_passes, cfg.backward_passes)
    passes = parse_passes(passes, "passes")
    tol = 0.0 if passes == "exact" else check_tol(tol, "tol")
    bound = BoundModel(cfg, params)
    x = bound.embed(tokens)
    done: dict[int, KV] = {}
    ran = jnp.int32(0)
    for start, end, iterated in cfg.layout.segments:
        layers = range(start, end + 1)
        if iterated:
            x, new, n = _iterate_block(bound, layers, x, mask, done, passes, init_kv or {}, tol)
            ran = jnp.maximum(ran, n)
        else:
            x, new = _run_layers(bound, layers, x, mask, done, {})
        done.update(new)
    return (x, done, ran) if return_passes else (x, done)


def token_mask(
    b: int,
    t: int,
    positions: jax.Array | None = None,
    valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> Mask:
    """The mask of a parallel pass over ``[b, t]`` tokens (queries and keys are the same
    tokens; the layers set strict/window): positions default to ``arange(t)``, or to
    `masks.segment_positions` of ``segment_ids``; invalid tokens' keys are never seen."""
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    if positions is None and segment_ids is not None:
        positions = segment_positions(segment_ids)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_pos = positions if valid is None else jnp.where(valid, positions, INVALID_POS)
    return Mask(positions, kv_pos, segment_ids, segment_ids)


# ------------------------------------------------------ sequential reference
def sequential_logits(
    cfg: ModelConfig, params: Params, tokens: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Ground truth (docs/design.md §3): tokens one at a time, layers bottom to top.

    Each layer reads only KVs that exist when it runs: its target's KVs at positions
    ``<= p`` if the target is at or below it (already computed for this token), else at
    positions ``< p``. ``tokens [b,T]`` -> logits ``[b,T,v]``. With ``segment_ids [b,T]``
    (packed documents) positions restart at 0 in every segment and a token reads only
    its own segment's KVs.
    """
    b, total = tokens.shape
    kh, h = cfg.num_kv_heads, cfg.hd
    buf = jnp.zeros((b, total, kh, h), jnp.dtype(cfg.dtype))
    cache = {j: (buf, buf) for j in cfg.layout.kv_layers}
    slots = jnp.arange(total, dtype=jnp.int32)
    segs = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if segs is None:
        positions = jnp.broadcast_to(slots, (b, total))
    else:
        positions = segment_positions(segs)

    @jax.jit
    def step(params, cache, token, p):
        bound = BoundModel(cfg, params)
        pos = jax.lax.dynamic_slice_in_dim(positions, p, 1, axis=1)
        q_seg = None if segs is None else jax.lax.dynamic_slice_in_dim(segs, p, 1, axis=1)
        x = bound.embed(token)
        for i, j in enumerate(cfg.layout.targets):
            q, own = bound.qkv(i, x, pos)
            if own is not None:
                k, v = cache[i]
                cache[i] = (k.at[:, p].set(own[0][:, 0]), v.at[:, p].set(own[1][:, 0]))
            written = p + 1 if j <= i else p
            kv_pos = jnp.where(slots < written, positions, INVALID_POS)
            mask = Mask(pos, kv_pos, q_seg, segs)
            x = bound.finish(i, x, bound.attend(i, q, cache[j], mask))
        return bound.logits(x)[:, 0], cache

    out = []
    for p in range(total):
        logits, cache = step(params, cache, tokens[:, p : p + 1], jnp.int32(p))
        out.append(logits)
    return jnp.stack(out, axis=1)
