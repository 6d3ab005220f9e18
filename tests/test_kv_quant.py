"""The quantized KV cache (``model.kv_cache_dtype``): quantization against a numpy
reference, the cache's bytes and scales, and int8 decode == decode over the dequantized
values (both slot layouts, standard and upward layouts, XLA and Pallas-interpret)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tinymodel import small_config

from kvshare_jax import cache_layout, kv_quant
from kvshare_jax.decode import cache_bytes, decode_step, init_cache, prefill
from kvshare_jax.masks import Mask
from kvshare_jax.model import BoundModel, init_params

PROMPTS = np.array([[5, 9, 2, 7, 1, 3], [4, 8, 6, 0, 0, 0]], np.int32)
LENGTHS = np.array([6, 3], np.int32)
STEPS = 3


def _np_quantize(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The definition, in numpy fp32: scale = max|x| * fl(1 / QMAX), q = clip(round(x / scale))."""
    qmax = np.float32(kv_quant.QMAX[dtype])
    x = x.astype(np.float32)
    scale = np.max(np.abs(x), axis=-1) * np.float32(1 / qmax)
    y = x / np.where(scale > 0, scale, np.float32(1))[..., None]
    if dtype == "int8":
        return np.clip(np.round(y), -qmax, qmax).astype(np.int8), scale  # half to even
    return np.clip(y, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn), scale


def _rows() -> np.ndarray:
    """Random rows ``[4, 3, 2, 16]`` of mixed magnitudes with a zero row and a row of ties."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2, 16)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 7, (4, 3, 2, 1))
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0, 0, 0, 0, 0, 0]
    return x


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantize_matches_the_numpy_reference(dtype):
    x = _rows()
    q, scale = kv_quant.quantize(jnp.asarray(x), dtype)
    want_q, want_scale = _np_quantize(x, dtype)
    assert q.dtype == jnp.dtype(dtype) and scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(scale), want_scale)  # exact scales
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), want_q.astype(np.float32))
    assert not np.isnan(np.asarray(q).astype(np.float32)).any()
    qmax = kv_quant.QMAX[dtype]
    assert np.abs(np.asarray(q).astype(np.float32)).max() == qmax  # the largest entry saturates
    np.testing.assert_array_equal(np.asarray(q[0, 0, 0]).astype(np.float32), 0)  # zero row
    assert float(scale[0, 0, 0]) == 0.0
    # dequantized error: half a step of the row's scale (int8)
    if dtype == "int8":
        err = np.abs(np.asarray(kv_quant.dequantize(q, scale)) - x)
        assert (err <= 0.5 * want_scale[..., None] * (1 + 1e-6)).all()


def test_int8_rounds_half_to_even_and_never_uses_minus_128():
    x = _rows()[0, 0, 1]  # max 127: scale exactly 1
    q, scale = kv_quant.quantize(jnp.asarray(x), "int8")
    assert float(scale) == 1.0
    np.testing.assert_array_equal(
        np.asarray(q)[:10], [127, 0, 2, 2, 0, -2, -2, 4, 126, -126]
    )  # fmt: skip
    q, _ = kv_quant.quantize(-jnp.abs(jnp.asarray(_rows())), "int8")
    assert int(q.min()) == -127


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_the_largest_entry_saturates_at_qmax_even_past_it(dtype):
    """max|x| * fl(1/QMAX) may fall below max|x| / QMAX, so the largest entry's quotient
    can exceed QMAX (127.00001): it is stored as exactly +-QMAX, never wrapped or NaN."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x[0] *= np.float32(3e37)  # near the fp32 maximum: no overflow either
    qmax = kv_quant.QMAX[dtype]
    scale = np.max(np.abs(x), -1) * np.float32(1 / qmax)
    over = np.abs(x / scale[:, None]).max(-1) > qmax
    assert over.sum() > 10 or dtype != "int8"  # such rows exist (for 1/127: fp8's rarely)
    q, _ = kv_quant.quantize(jnp.asarray(x), dtype)
    q = np.asarray(q).astype(np.float32)
    np.testing.assert_array_equal(np.abs(q).max(-1), qmax)
    np.testing.assert_array_equal(q, _np_quantize(x, dtype)[0].astype(np.float32))


def test_quantized_cache_holds_int8_slots_and_fp32_scales():
    cfg = small_config("pizza-top:3", kv_cache_dtype="int8")
    for platform in ("cpu", "tpu"):
        cache = init_cache(cfg, 2, 10, platform=platform)
        rows = 2 * cfg.num_kv_heads
        assert len(cache.k_scale) == len(cache.v_scale) == len(cache.k) == 3
        assert all(x.dtype == jnp.int8 for x in (*cache.k, *cache.v))
        assert all(s.shape == (rows, cache.length) for s in (*cache.k_scale, *cache.v_scale))
        assert all(s.dtype == jnp.float32 for s in cache.k_scale)
    cache = init_cache(cfg, 2, 10)
    arrays = (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale)
    assert sum(x.nbytes for x in arrays) == cache_bytes(cfg, 2, 10)
    full = dataclasses.replace(cfg, kv_cache_dtype="")
    per_row = cfg.hd * 1 + 4  # int8 entries + one fp32 scale
    assert cache_bytes(cfg, 2, 10) * cfg.hd * 4 == cache_bytes(full, 2, 10) * per_row
    assert init_cache(full, 2, 10).k_scale == ()


@functools.cache
def _model(spec: str, kv_dtype: str = "int8", impl: str = "xla"):
    cfg = small_config(spec, kv_cache_dtype=kv_dtype, attention_impl=impl, max_len=16)
    return cfg, init_params(cfg, jax.random.key(0))


def _dequantized(cache, layout: str) -> tuple[list, list]:
    """fp32 slots holding the dequantized values of a quantized cache."""

    def deq(q, s):
        return q.astype(jnp.float32) * (s[:, :, None] if layout == "SH" else s[:, None, :])

    ks = [deq(q, s) for q, s in zip(cache.k, cache.k_scale, strict=True)]
    vs = [deq(q, s) for q, s in zip(cache.v, cache.v_scale, strict=True)]
    return ks, vs


def reference_step(cfg, params, cache, tokens, dtype: str = "int8"):
    """A decode step over fp32 slots holding the dequantized cache, each new token's K/V
    quantized and dequantized as the quantized step stores them; unquantized attention."""
    full = dataclasses.replace(cfg, kv_cache_dtype="")
    bound, lay, at = BoundModel(full, params), cache.layout, cache.index
    ks, vs = _dequantized(cache, lay)
    q_pos = cache.pos[:, None]
    mask = Mask(q_pos, jax.lax.dynamic_update_slice(cache.kv_pos, q_pos, (0, at)))
    x = bound.embed(tokens[:, None])
    for i, slot in enumerate(cfg.layout.slot_of_layer):
        q, own = bound.qkv(i, x, q_pos)
        if own is not None:
            k, v = (kv_quant.dequantize(*kv_quant.quantize(o, dtype)) for o in own)
            ks[slot] = cache_layout.write(lay, ks[slot], k, at)
            vs[slot] = cache_layout.write(lay, vs[slot], v, at)
        x = bound.finish(i, x, bound.attend(i, q, (ks[slot], vs[slot]), mask, cache=lay))
    return bound.logits(x)[:, 0]


CASES = [(spec, platform, "xla") for spec in ("standard", "pizza-top:3", "lasagna-top:3")
         for platform in ("cpu", "tpu")]  # fmt: skip
CASES += [("pizza-top:3", "cpu", "pallas"), ("lasagna-top:3", "tpu", "pallas")]


@pytest.mark.parametrize("spec, platform, impl", CASES)  # platform: SH (cpu) or HS slots
def test_int8_decode_equals_decode_over_the_dequantized_cache(spec, platform, impl):
    """Pallas on CPU: the Triton kernel in interpret mode (HS slots transposed to SH)."""
    cfg, params = _model(spec, impl=impl)
    cache = init_cache(cfg, 2, PROMPTS.shape[1] + STEPS, platform=platform)
    logits, cache = prefill(cfg, params, cache, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS))
    step = jax.jit(functools.partial(decode_step, cfg))
    ref = jax.jit(functools.partial(reference_step, cfg))
    for _ in range(STEPS):
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        want = ref(params, cache, tokens)
        logits, cache = step(params, cache, tokens)
        # the same products, the scales applied after the dots: fp32 rounding apart
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert all(k.dtype == jnp.int8 for k in cache.k)


def test_prefill_writes_the_quantized_full_precision_kvs():
    """Prefill quantizes what it writes: the slots hold quantize(unquantized prefill's KVs)."""
    cfg, params = _model("pizza-top:3")
    full = dataclasses.replace(cfg, kv_cache_dtype="")
    args = (jnp.asarray(PROMPTS), jnp.asarray(LENGTHS))
    _, cache_q = prefill(cfg, params, init_cache(cfg, 2, 8), *args)
    _, cache_f = prefill(full, params, init_cache(full, 2, 8), *args)
    for slot in range(len(cache_f.k)):
        want_q, want_s = kv_quant.quantize(cache_f.k[slot], "int8")  # SH rows [B, S, h]
        np.testing.assert_array_equal(np.asarray(cache_q.k_scale[slot]), np.asarray(want_s))
        np.testing.assert_array_equal(np.asarray(cache_q.k[slot]), np.asarray(want_q))
