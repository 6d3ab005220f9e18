"""Reference attention masks against a direct numpy implementation."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvshare_jax import cache_layout
from kvshare_jax.attention import INVALID_POS, attention, resolve_impl, xla_attention
from kvshare_jax.masks import Mask, segment_positions
from kvshare_jax.sampling import greedy_argmax


def numpy_attention(q, k, v, q_pos, kv_pos, strict, window, q_seg=None, kv_seg=None):
    """Loops over every (batch, head, query): the definition, written out."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            kh = ni // group
            for ti in range(t):
                p = q_pos[bi, ti]
                seen = [
                    s
                    for s in range(k.shape[1])
                    if kv_pos[bi, s] != INVALID_POS
                    and (kv_pos[bi, s] < p if strict else kv_pos[bi, s] <= p)
                    and (window is None or kv_pos[bi, s] > p - window)
                    and (q_seg is None or q_seg[bi, ti] == kv_seg[bi, s])
                ]
                if not seen:
                    continue
                scores = np.array([q[bi, ti, ni] @ k[bi, s, kh] for s in seen]) / np.sqrt(h)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, ti, ni] = sum(wi * v[bi, s, kh] for wi, s in zip(w, seen, strict=True))
    return out


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("segments", [False, True])
def test_masks_match_numpy(strict, window, heads, offset, segments):
    rng = np.random.default_rng(0)
    n, kh = heads
    b, t, s, h = 2, 6, 11, 8
    q = rng.standard_normal((b, t, n, h), dtype=np.float32)
    k = rng.standard_normal((b, s, kh, h), dtype=np.float32)
    v = rng.standard_normal((b, s, kh, h), dtype=np.float32)
    q_pos = np.tile(np.arange(t, dtype=np.int32) + offset, (b, 1))
    kv_pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    kv_pos[1, 8:] = INVALID_POS  # second sequence: unwritten tail
    q_seg = kv_seg = None
    if segments:  # documents [0, 4), [4, 9), [9, 11) of the keys; queries in the last two
        kv_seg = np.tile(np.repeat(np.array([1, 2, 3], np.int32), [4, 5, 2]), (b, 1))
        q_seg = np.tile(np.array([2, 2, 2, 3, 3, 3], np.int32), (b, 1))
    mask = Mask(q_pos, kv_pos, q_seg, kv_seg, strict=strict, window=window)
    got = np.asarray(xla_attention(q, k, v, mask))
    want = numpy_attention(q, k, v, q_pos, kv_pos, strict, window, q_seg, kv_seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the decoder's cache slots, rows [b*k,s,h] (SH) and [b*k,h,s] (HS), contracted as stored
    for layout in cache_layout.LAYOUTS:
        kr, vr = (cache_layout.to_slot(layout, x) for x in (k, v))
        got = xla_attention(q, kr, vr, mask, cache=layout)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", cache_layout.LAYOUTS)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cache_slot_decode_query_matches_the_definition(impl, layout):
    """One query per sequence (a decode step) over cache slots of either layout, ragged
    positions with prompt padding (INVALID_POS inside the written part), GQA."""
    rng = np.random.default_rng(3)
    b, s, n, kh, h = 3, 16, 4, 2, 8
    q = rng.standard_normal((b, 1, n, h), dtype=np.float32)
    k = rng.standard_normal((b, s, kh, h), dtype=np.float32)
    v = rng.standard_normal((b, s, kh, h), dtype=np.float32)
    q_pos = np.array([[3], [9], [15]], np.int32)
    kv_pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    kv_pos[0, 2:6] = INVALID_POS  # a short prompt's padding indices
    kv_pos[0, 6:] -= 4
    want = numpy_attention(q, k, v, q_pos, kv_pos, False, None)
    kr, vr = (cache_layout.to_slot(layout, jnp.asarray(x)) for x in (k, v))
    got = attention(q, kr, vr, Mask(q_pos, kv_pos), impl=impl, cache=layout)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # packed prompts: the decode query reads only its own segment's cache entries
    kv_seg = np.tile(np.repeat(np.array([1, 2], np.int32), [7, 9]), (b, 1))
    q_seg = np.array([[1], [2], [2]], np.int32)
    want = numpy_attention(q, k, v, q_pos, kv_pos, False, None, q_seg, kv_seg)
    got = attention(q, kr, vr, Mask(q_pos, kv_pos, q_seg, kv_seg), impl=impl, cache=layout)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_greedy_argmax_is_argmax_with_ties_and_nans():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[1, [7, 200]] = 9.0  # tie: the first index wins
    logits[2, [11, 250]] = np.nan  # NaN: the first NaN wins, as in jnp.argmax
    logits[3] = -np.inf
    logits[4, 299] = np.inf
    got = np.asarray(greedy_argmax(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(logits, -1)))
    assert got.dtype == np.int32 and got.tolist()[1:] == [7, 11, 0, 299]


def test_strict_position_zero_is_exactly_zero():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 2, 8), dtype=np.float32)
    k = rng.standard_normal((1, 4, 2, 8), dtype=np.float32)
    pos = np.arange(4, dtype=np.int32)[None]
    out = np.asarray(xla_attention(q, k, k, Mask(pos, pos, strict=True)))
    assert np.all(out[:, 0] == 0.0) and np.all(np.isfinite(out))
    assert np.all(np.abs(out[:, 1:]) > 0)
    # the first token of every document of a packed row, strict: exactly zero too
    seg = np.array([[1, 1, 2, 2]], np.int32)
    spos = np.asarray(segment_positions(jnp.asarray(seg)))
    out = np.asarray(xla_attention(q, k, k, Mask(spos, spos, seg, seg, strict=True)))
    assert np.all(out[:, [0, 2]] == 0.0) and np.all(np.abs(out[:, [1, 3]]) > 0)


def test_segment_positions_restart_in_every_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    got = np.asarray(segment_positions(seg))
    np.testing.assert_array_equal(got, [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])
    assert got.dtype == np.int32


def test_mask_is_one_value():
    """A pytree whose leaves are its arrays (no segments: no leaves for them) and whose
    rule is static; segment ids come in pairs; the window is a positive int."""
    import jax

    pos = jnp.zeros((1, 3), jnp.int32)
    assert len(jax.tree.leaves(Mask(pos, pos, strict=True, window=2))) == 2
    assert len(jax.tree.leaves(Mask(pos, pos, pos, pos))) == 4
    a, b = Mask(pos, pos, window=2), Mask(pos, pos, window=3)
    assert jax.tree.structure(a) != jax.tree.structure(b)  # jit specialises on the rule
    assert Mask(pos, pos).rule(strict=True, window=None).spec.strict
    with pytest.raises(ValueError, match="both q_seg and kv_seg"):
        Mask(pos, pos, pos)
    with pytest.raises(ValueError, match="window must be"):
        Mask(pos, pos, window=0)


def test_resolve_impl():
    assert resolve_impl("auto") == "xla"  # CPU
    assert resolve_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("cuda")
