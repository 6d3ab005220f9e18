"""Quantized KV cache: symmetric scales per token and KV head (docs/design.md §5).

Shapes: ``...`` any leading axes (``[c, t, k]`` time-major KVs), h head dim.

``model.kv_cache_dtype`` names what the decode cache stores: ``""`` or the model dtype
(unquantized), ``"int8"`` or ``"float8_e4m3fn"``. Both quantized kinds are one
mechanism: a vector ``x [..., h]`` is stored as ``q = x / scale`` in the cache dtype with
an fp32 ``scale = max|x| / QMAX`` beside it (computed as ``max|x| * fl(1 / QMAX)``,
which XLA makes of the division by a constant anyway) (``QMAX`` 127 for int8, 448, the largest
finite e4m3fn value, for fp8), so ``x ~ q * scale``.

- int8: ``q = clip(round(x / scale), -127, 127)``, rounding to nearest with ties to
  even (``jnp.round``); -128 is never used (the range is symmetric).
- fp8: ``q = clip(x / scale, -448, 448)`` cast to e4m3fn (the cast rounds to nearest
  even). Scaled rather than a plain cast: e4m3fn has no infinity (a value past 448
  casts to NaN) and only 3 mantissa bits over a narrow exponent range, so unscaled
  small keys would lose bits to subnormals.
- A zero vector has scale 0 and stores zeros (never 0/0).

Scales are fp32: a bf16 scale would add a relative error of up to 2^-9 to every
dequantized value, about the int8 rounding error itself (1/254 of the largest entry),
for a saving of 2 bytes per token and head (int8 slots of h = 64 hold 64 bytes per
token and head: scales are 6.25% of the cache in fp32, 3.1% in bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}  # the quantized cache dtypes
SCALE_DTYPE = jnp.float32


def quantized(kv_cache_dtype: str) -> bool:
    """Whether the cache of ``kv_cache_dtype`` stores quantized values with scales."""
    return kv_cache_dtype in QMAX


def check(kv_cache_dtype: str, dtype: str) -> None:
    """Raises a one-line ``ValueError`` unless ``kv_cache_dtype`` is ``""``, the model
    ``dtype`` or a quantized dtype."""
    if kv_cache_dtype not in ("", dtype, *QMAX):
        raise ValueError(
            f"kv_cache_dtype must be '' (the model dtype, {dtype}), int8 or float8_e4m3fn, "
            f"got {kv_cache_dtype!r}"
        )


def storage_dtype(kv_cache_dtype: str, dtype: str) -> jnp.dtype:
    """The dtype of the cache slots: the quantized dtype, else the model ``dtype``."""
    return jnp.dtype(kv_cache_dtype if quantized(kv_cache_dtype) else dtype)


def quantize(x: jax.Array, dtype: str) -> tuple[jax.Array, jax.Array]:
    """``x [..., h]`` -> ``(q [..., h] in dtype, scale [...] fp32)`` with ``x ~ q * scale``."""
    qmax = QMAX[dtype]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) * jnp.float32(1 / qmax)  # (XLA's / qmax, too)
    y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dtype == "int8":
        y = jnp.round(y)
    return jnp.clip(y, -qmax, qmax).astype(dtype), scale.astype(SCALE_DTYPE)


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``q [..., h] * scale [...]`` in ``dtype`` (the reference; readers fold the scales
    into scores and probabilities instead)."""
    return (q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)
