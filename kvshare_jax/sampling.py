"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus).

Shapes: b batch, v vocabulary, k kept candidates.

A :class:`Sampling` is hashable, so the jitted decoder specialises on it: greedy
decoding compiles to two plain reductions (`greedy_argmax`) and only top-p pays for a sort.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits."""

    temperature: float = 0.0  # 0 = greedy (argmax); top_k / top_p are then ignored
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p (1 = all)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def greedy_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` as int32 (first maximum; first NaN if any), computed as a
    max and a min-index reduction. XLA:CPU runs ``argmax``'s (value, index) reduction
    unvectorised: 150 us per 32000-token row here, ~5% of a batch-1 decode step."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if the row has one
    hit = (logits == top) | (jnp.isnan(logits) & jnp.isnan(top))
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Draws one token per row of ``logits [b,v]`` -> ``[b]`` int32."""
    if sampling.greedy:
        return greedy_argmax(logits)
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    k = min(sampling.top_k or vocab, vocab)
    if k == vocab and sampling.top_p == 1.0:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    # Candidates sorted by decreasing logit: [b, k] values and their token ids.
    values, ids = jax.lax.top_k(logits, k)
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better candidates
        values = jnp.where(before < sampling.top_p, values, -jnp.inf)
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
