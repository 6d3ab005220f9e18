"""Pallas flash attention (interpret mode on CPU) against the XLA reference, for both
variants: the Triton/CPU kernel (``platform="cpu"``, the default here, and once with GPU
tiles, ``platform="gpu", interpret=True``) and the TPU (Mosaic) kernels in the TPU
interpreter (``platform="tpu", interpret=True``).

Every case checks the forward output and dq, dk, dv (``jax.vjp`` with a random
cotangent). Shapes are tiny and the batch rows carry different position patterns so one
compilation covers many scenarios: row 0 starts at position 0 (under ``strict`` its first
query sees nothing), row 1 has its queries at the end of the keys and padded keys
(``INVALID_POS``), row 2 has shuffled key positions with two invalid slots. The TPU cases
use more than 128 keys so that several key tiles (multiples of 128) are reduced over,
some skipped and some taken by the unmasked (wholly visible) path. The ``-seg`` cases
pack three documents into every row (segment ids; positions restarting at 0 in each
document in rows 0 and 1), so tiles wholly in other documents are skipped and the first
query of each document under ``strict`` sees nothing.
"""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from kvshare_jax import cache_layout
from kvshare_jax.attention import INVALID_POS, attention, attention_mask, xla_attention
from kvshare_jax.kernels import flash_attention, flash_cache_attention, flash_tpu, pallas_attention
from kvshare_jax.kernels.flash import block_size, padded_head_dim
from kvshare_jax.masks import Mask

REPO = Path(__file__).resolve().parents[1]


def _positions(t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q_pos = np.stack([np.arange(t), np.arange(t) + s - t, np.arange(t) + (s - t) // 2])
    kv_pos = np.stack([np.arange(s)] * 3)
    kv_pos[1, -3:] = INVALID_POS
    kv_pos[2] = rng.permutation(s)
    kv_pos[2, rng.choice(s, 2, replace=False)] = INVALID_POS
    return q_pos.astype(np.int32), kv_pos.astype(np.int32)


def _mask(t: int, s: int, strict, window, segments: bool = False) -> Mask:
    """The rows of :func:`_positions`; with ``segments`` the keys hold three documents
    (ids 1, 2, 3 by key index; rows 0 and 1 restart positions in each) and each query
    lies in the document of the key index it sits at."""
    q_pos, kv_pos = _positions(t, s)
    if not segments:
        return Mask(q_pos, kv_pos, strict=strict, window=window)
    at = np.stack([np.arange(t), np.arange(t) + s - t, np.arange(t) + (s - t) // 2])
    kv_seg = np.tile(np.arange(s) * 3 // s + 1, (3, 1)).astype(np.int32)
    q_seg = np.take_along_axis(kv_seg, at, 1)
    starts = np.searchsorted(kv_seg[0], [1, 2, 3])
    restarted = np.arange(s) - starts[kv_seg[0] - 1]
    for row in (0, 1):
        kv_pos[row] = np.where(kv_pos[row] == INVALID_POS, INVALID_POS, restarted)
        q_pos[row] = restarted[at[row]]
    return Mask(q_pos, kv_pos, q_seg, kv_seg, strict=strict, window=window)


def _inputs(t, s, n, kh, h, dtype):
    ks = jax.random.split(jax.random.PRNGKey(t * 1000 + s), 4)
    q = jax.random.normal(ks[0], (3, t, n, h), dtype)
    k = jax.random.normal(ks[1], (3, s, kh, h), dtype)
    v = jax.random.normal(ks[2], (3, s, kh, h), dtype)
    ct = jax.random.normal(ks[3], (3, t, n, h), dtype)
    return q, k, v, ct


# Tiny shapes: compile time dominates, and XLA's backend optimisations double it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compile_and_run(f, *args):
    return jax.jit(f).lower(*args).compile(FAST_COMPILE)(*args)


def _fwd_bwd(fn, q, k, v, ct, mask, **kwargs):
    """``(out, dq, dk, dv)`` of ``fn`` with cotangent ``ct``."""

    def f(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, **kwargs), q, k, v)
        return (out, *vjp(ct))

    return _compile_and_run(f, q, k, v, ct)


CASES = [
    # name,          strict, window, n, kh, t, s, h, dtype, block_q, block_k
    ("causal-g1", False, None, 2, 2, 37, 37, 32, jnp.float32, 8, 16),
    ("strict-g2", True, None, 4, 2, 13, 29, 16, jnp.float32, 8, 8),
    ("window-g4-h20", False, 5, 8, 2, 19, 40, 20, jnp.float32, 16, 8),
    ("window-strict-g2", True, 7, 4, 2, 24, 24, 16, jnp.float32, 16, 16),
    ("causal-g4-bf16", False, None, 4, 1, 21, 35, 32, jnp.bfloat16, 16, 8),
    ("strict-g2-seg", True, None, 4, 2, 13, 29, 16, jnp.float32, 8, 8),
    ("window-strict-g2-seg", True, 7, 4, 2, 24, 24, 16, jnp.float32, 16, 16),
]
# TPU tiles: query rows a multiple of 8 (16 for bfloat16), keys a multiple of 128.
TPU_CASES = [
    ("tpu-causal-g1", False, None, 2, 2, 37, 300, 32, jnp.float32, 8, 128),
    ("tpu-strict-g2", True, None, 4, 2, 13, 260, 16, jnp.float32, 8, 128),
    ("tpu-window-g4-h20", False, 5, 8, 2, 19, 300, 20, jnp.float32, 16, 128),
    ("tpu-window-strict-g2", True, 7, 4, 2, 24, 256, 16, jnp.float32, 16, 128),
    ("tpu-causal-g4-bf16", False, None, 4, 1, 21, 290, 32, jnp.bfloat16, 16, 128),
    ("tpu-default-blocks-g8-h64", True, None, 8, 1, 5, 40, 64, jnp.float32, None, None),
    ("tpu-causal-g1-seg", False, None, 2, 2, 37, 300, 32, jnp.float32, 8, 128),
    ("tpu-window-strict-g2-seg", True, 7, 4, 2, 24, 256, 16, jnp.float32, 16, 128),
    ("tpu-causal-g4-bf16-seg", False, None, 4, 1, 21, 290, 32, jnp.bfloat16, 16, 128),
]


# The Triton kernels with GPU tiles (powers of two >= 16, head dim padded to 32).
GPU_CASES = [
    ("gpu-window-strict-g2-h20", True, 9, 4, 2, 21, 40, 20, jnp.float32, 16, 16),
    ("gpu-strict-g2-h20-seg", True, None, 4, 2, 21, 40, 20, jnp.float32, 16, 16),
]
ALL_CASES = CASES + TPU_CASES + GPU_CASES


@pytest.mark.parametrize(
    "platform, strict, window, n, kh, t, s, h, dtype, block_q, block_k",
    [("cpu", *c[1:]) for c in CASES]
    + [("tpu", *c[1:]) for c in TPU_CASES]
    + [("gpu", *c[1:]) for c in GPU_CASES],
    ids=[c[0] for c in ALL_CASES],
)
def test_matches_reference(
    platform, strict, window, n, kh, t, s, h, dtype, block_q, block_k, request
):
    q, k, v, ct = _inputs(t, s, n, kh, h, dtype)
    mask = _mask(t, s, strict, window, segments=request.node.callspec.id.endswith("-seg"))
    kernel = functools.partial(
        pallas_attention, block_q=block_q, block_k=block_k, platform=platform, interpret=True
    )
    got = _fwd_bwd(kernel, q, k, v, ct, mask)
    want = _fwd_bwd(xla_attention, q, k, v, ct, mask)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == w.dtype == dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol, err_msg=name
        )

    # Rows that see no key: output and dq exactly zero (strict: row 0 / position 0).
    empty = ~np.asarray(attention_mask(mask)).any(-1)
    assert empty[0, 0] == strict
    np.testing.assert_array_equal(np.asarray(got[0], np.float32)[empty], 0.0)
    np.testing.assert_array_equal(np.asarray(got[1], np.float32)[empty], 0.0)


def test_decode_shape():
    """t = 1 against a cache with per-sequence lengths, via ``attention(impl="pallas")``."""
    strict, window = True, 8
    s, n, kh, h = 40, 8, 2, 16
    q, k, v, _ = _inputs(1, s, n, kh, h, jnp.float32)
    lengths = np.array([40, 17, 1])
    kv_pos = np.where(np.arange(s) < lengths[:, None], np.arange(s), INVALID_POS)
    q_pos = (lengths - 1)[:, None]
    kv_pos, q_pos = kv_pos.astype(np.int32), q_pos.astype(np.int32)
    mask = Mask(q_pos, kv_pos, strict=strict, window=window)
    got = _compile_and_run(lambda q, k, v: attention(q, k, v, mask, impl="pallas"), q, k, v)
    want = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)  # length 1: strict hides its only key


TPU_KERNELS = (
    "kvshare_flash_tpu_fwd",
    "kvshare_flash_tpu_dq",
    "kvshare_flash_tpu_dkv",
    "kvshare_flash_tpu_decode",
)


def _kernel_names(fn, *args) -> set[str]:
    """Names of the TPU Pallas kernels in the jaxpr of ``fn(*args)``."""
    text = str(jax.make_jaxpr(fn)(*args))
    return {name for name in TPU_KERNELS if name in text}


@pytest.mark.parametrize(
    "t, n, kh, h, dtype, segments",
    [
        (1, 8, 2, 128, jnp.float32, False),
        (1, 12, 6, 64, jnp.bfloat16, False),  # llama_110m's heads: h = 64
        (2, 8, 1, 64, jnp.float32, False),
        (1, 8, 2, 128, jnp.float32, True),
        (2, 8, 1, 64, jnp.float32, True),
    ],
)
def test_tpu_decode_matches_reference(t, n, kh, h, dtype, segments):
    """TPU variants (interpreted) at decode shapes: a cache of 384 positions in 3 key
    tiles with per-sequence lengths. The time-minor slots go through the decode kernel,
    the training kernels' forward and gradients run at the same shapes. With
    ``segments`` the cache packs documents [0, 100), [100, 250), [250, 384) (positions
    restarting) and the queries continue each row's last written document."""
    s, strict, window = 384, True, 150
    q, k, v, ct = _inputs(t, s, n, kh, h, dtype)
    lengths = np.array([384, 140, 1])
    index = np.arange(s)
    q_seg = kv_seg = None
    if segments:
        seg = np.searchsorted([100, 250], index, side="right") + 1
        starts = np.array([0, 100, 250])[seg - 1]
        kv_pos = np.where(index < lengths[:, None], index - starts, INVALID_POS)
        q_index = np.maximum(lengths[:, None] - t + np.arange(t), 0)
        q_pos, q_seg = (index - starts)[q_index], seg[q_index].astype(np.int32)
        kv_seg = np.tile(seg, (3, 1)).astype(np.int32)
    else:
        kv_pos = np.where(index < lengths[:, None], index, INVALID_POS)
        q_pos = np.maximum(lengths[:, None] - t + np.arange(t), 0)
    kv_pos, q_pos = kv_pos.astype(np.int32), q_pos.astype(np.int32)
    mask = Mask(q_pos, kv_pos, q_seg, kv_seg, strict=strict, window=window)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    want = xla_attention(q, k, v, mask)
    slots = {lay: [cache_layout.to_slot(lay, x) for x in (k, v)] for lay in cache_layout.LAYOUTS}

    def decode(q, k, v):  # slots viewed per batch row, as the sharded wrapper passes them
        k, v = (x.reshape(3, kh, *x.shape[1:]) for x in (k, v))
        return flash_cache_attention(
            q, k, v, mask, layout="HS", platform="tpu", interpret=True, block_k=128
        )

    assert _kernel_names(decode, q, *slots["HS"]) == {"kvshare_flash_tpu_decode"}
    got = _compile_and_run(decode, q, *slots["HS"])
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )
    np.testing.assert_array_equal(np.asarray(got, np.float32)[2, -1], 0.0)  # sees nothing

    fa = functools.partial(flash_attention, platform="tpu", interpret=True, block_k=128)
    assert _kernel_names(lambda *a: fa(*a, mask), q, k, v) == {"kvshare_flash_tpu_fwd"}
    got = _fwd_bwd(fa, q, k, v, ct, mask)
    want = _fwd_bwd(xla_attention, q, k, v, ct, mask)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol, err_msg=name
        )


def test_tiles_of_other_documents_are_skipped():
    """Tile skipping with segment ids: in a row packing documents of 256 and 256 tokens
    (positions restarting), key tiles of 128 of the first document are never visited by
    the query tiles of the second, and a tile pair wholly inside one document is
    unmasked; without segment ids the position test alone would visit them."""
    from kvshare_jax.kernels.common import may_overlap, wholly_visible
    from kvshare_jax.masks import MaskSpec

    seg = np.repeat(np.array([1, 2], np.int32), 256)[None]
    pos = np.concatenate([np.arange(256), np.arange(256)]).astype(np.int32)[None]
    spec = MaskSpec(strict=False, window=None, segments=True)
    cfg = flash_tpu._config(16, Mask(pos, pos, seg, seg), 128, 128, True)
    _, (first, last), _ = flash_tpu._tile_ranges(pos, pos, seg, seg, 128, 128, cfg)
    np.testing.assert_array_equal(first, [0, 0, 2, 2])  # query tiles 2, 3: document 2
    np.testing.assert_array_equal(last, [0, 1, 2, 3])
    cfg = flash_tpu._config(16, Mask(pos, pos), 128, 128, True)
    _, (first, last), _ = flash_tpu._tile_ranges(pos, pos, None, None, 128, 128, cfg)
    np.testing.assert_array_equal(first, [0, 0, 0, 0])  # positions alone: all visited
    # the shared test: query tile of document 2 against a key tile of document 1
    args = (0, 127, 0, 127)
    assert not may_overlap(*args, spec, (2, 2, 1, 1))
    assert may_overlap(*args, spec, (2, 2, 1, 2))
    assert may_overlap(*args, MaskSpec(), None)
    assert wholly_visible(128, 255, 0, 127, True, spec, (2, 2, 2, 2))
    assert not wholly_visible(128, 255, 0, 127, True, spec, (2, 2, 1, 2))


def test_block_and_head_dim_rules():
    assert block_size(None, 5, "gpu", "q") == 16  # minimum Triton tile
    assert block_size(None, 300, "gpu", "k") == 128
    assert block_size(64, 40, "gpu", "k") == 64  # next power of two covering 40
    assert block_size(None, 8, "cpu", "q") == 8
    assert block_size(None, 100, "cpu", "q") == 32
    assert [padded_head_dim(h, "gpu") for h in (8, 64, 80)] == [16, 64, 128]
    assert padded_head_dim(20, "cpu") == 24
    with pytest.raises(ValueError, match="power of two"):
        block_size(48, 100, "gpu", "q")
    with pytest.raises(ValueError, match="positive int"):
        block_size(0, 100, "cpu", "q")


def test_tpu_block_rules():
    bs = flash_tpu.block_sizes
    v5e = flash_tpu.GENERATION_BLOCKS["v5e"]
    assert bs(16384, 2048, 64, jnp.bfloat16, "TPU v5 lite") == (v5e.block_q, v5e.block_k)
    assert bs(16384, 2048, 64, jnp.bfloat16, "TPU v6 lite")[1] == 1024
    assert bs(16384, 2048, 64, jnp.bfloat16, "cpu") == (256, 512)  # unknown kind: defaults
    assert bs(5, 40, 64, jnp.bfloat16, "TPU v4") == (16, 40)  # rows padded to 16 for bf16
    assert bs(30, 1000, 64, jnp.float32, "TPU v4") == (32, 1000)  # whole rows and keys
    # Few rows (decode): the key tile fills 1 MiB of VMEM (h lane-padded to 128).
    assert bs(8, 32768, 64, jnp.bfloat16, "TPU v5 lite") == (16, 4096)
    assert bs(8, 32768, 32, jnp.float32, "TPU v5 lite") == (8, 2048)
    assert bs(1000, 5000, 64, jnp.float32, None, block_q=64, block_k=256) == (64, 256)
    assert [flash_tpu.generation(k) for k in ("TPU v4", "TPU v5", "TPU v5e", "x")] == [
        "v4",
        "v5p",
        "v5e",
        None,
    ]
    db = flash_tpu.decode_block  # K tiles [kv_heads, h, keys]: h on sublanes, unpadded
    assert db(300, 8, 128, jnp.bfloat16, "TPU v5 lite") == 300  # all keys fit
    assert db(32768, 8, 128, jnp.bfloat16, "TPU v5 lite") == 512  # 1 MiB / (8 * 256 B)
    assert db(32768, 8, 64, jnp.bfloat16, "TPU v5 lite") == 1024  # h = 64: twice the keys
    assert db(32768, 8, 128, jnp.float32, "TPU v5 lite") == 256
    assert db(3000, 1, 128, jnp.float32, None, block_k=1024) == 1024  # nothing divides
    assert db(3072, 1, 128, jnp.float32, None, block_k=1024) == 1024
    assert db(2560, 1, 128, jnp.float32, None, block_k=1024) == 640  # divides 2560
    with pytest.raises(ValueError, match="multiple of 128"):
        bs(100, 1000, 64, jnp.float32, None, block_k=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        bs(100, 1000, 64, jnp.bfloat16, None, block_q=8)
    with pytest.raises(ValueError, match="positive int"):
        bs(100, 1000, 64, jnp.float32, None, block_q=True)


_MASK_FIELDS = ("q_pos", "kv_pos", "q_seg", "kv_seg", "window")


def _bad(**changes):
    """``(arrays, mask fields, keywords)`` of a call with ``changes``."""
    args = dict(
        q=jnp.zeros((2, 5, 4, 16)),
        k=jnp.zeros((2, 7, 2, 16)),
        v=jnp.zeros((2, 7, 2, 16)),
    )
    mask = dict(q_pos=jnp.zeros((2, 5), jnp.int32), kv_pos=jnp.zeros((2, 7), jnp.int32))
    mask.update({name: changes.pop(name) for name in _MASK_FIELDS if name in changes})
    kwargs = {name: changes.pop(name) for name in list(changes) if name not in args}
    args.update(changes)
    return args, mask, kwargs


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(k=jnp.zeros((2, 7, 3, 16)), v=jnp.zeros((2, 7, 3, 16))), "multiple of KV heads"),
        (dict(v=jnp.zeros((2, 7, 2, 8))), "k and v shapes differ"),
        (dict(k=jnp.zeros((2, 7, 2, 8)), v=jnp.zeros((2, 7, 2, 8))), "batch or head dim"),
        (dict(q=jnp.zeros((2, 5, 4, 16), jnp.bfloat16)), "share one dtype"),
        (
            dict(
                q=jnp.zeros((2, 5, 4, 16), jnp.float16),
                k=jnp.zeros((2, 7, 2, 16), jnp.float16),
                v=jnp.zeros((2, 7, 2, 16), jnp.float16),
            ),
            "share one dtype",
        ),
        (dict(kv_pos=jnp.zeros((2, 6), jnp.int32)), "positions must be"),
        (dict(q_pos=jnp.zeros((2, 5))), "must be integers"),
        (
            dict(kv_seg=jnp.zeros((2, 6), jnp.int32), q_seg=jnp.zeros((2, 5), jnp.int32)),
            "segment ids must be",
        ),
        (dict(q=jnp.zeros((2, 5, 64))), "expected q"),
        (dict(window=0), "window must be"),
        (dict(block_k=-8), "positive int"),
        (dict(interpret=False), "pass interpret=True"),
        (dict(platform="tpu", block_k=64), "multiple of 128"),
        (dict(platform="tpu", block_q=12), "multiple of 8"),
        (dict(platform="metal"), "unknown platform"),
    ],
)
def test_clear_errors(changes, match):
    args, mask, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        pallas_attention(**args, mask=Mask(**mask), **kwargs)


def test_sharding_divisibility_error():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    args, mask, _ = _bad()
    with pytest.raises(ValueError, match="cannot shard attention"):
        pallas_attention(**args, mask=Mask(**mask), mesh=mesh)  # batch 2 over data*fsdp = 4


SHARDED_SCRIPT = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from kvshare_jax.kernels import flash_attention, pallas_attention
    from kvshare_jax.masks import Mask

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    b, t, n, kh, h = 4, 16, 4, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, ct = (jax.random.normal(x, (b, t, n, h)) for x in ks[:2])
    k, v = (jax.random.normal(x, (b, t, kh, h)) for x in ks[2:])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # rows 0 and 2 pack two documents (positions restart at 0 in each): segment ids
    seg = jnp.where((jnp.arange(b)[:, None] % 2 == 0) & (jnp.arange(t) >= 6), 2, 1)
    pos = jnp.where(seg == 2, pos - 6, pos).astype(jnp.int32)
    mask = Mask(pos, pos, seg, seg, strict=True, window=6)

    def fwd_bwd(fn, q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return (out, *vjp(ct))

    blocks = dict(block_q=8, block_k=8)
    fast = {"xla_backend_optimization_level": 0}
    unsharded = jax.jit(functools.partial(fwd_bwd, functools.partial(flash_attention, **blocks)))
    want = unsharded.lower(q, k, v).compile(fast)(q, k, v)
    sharded = jax.jit(functools.partial(fwd_bwd, functools.partial(pallas_attention, **blocks)))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        qs, ks_, vs = (jax.device_put(x, heads) for x in (q, k, v))
        lowered = sharded.lower(qs, ks_, vs)
        text = lowered.as_text()
        got = lowered.compile(fast)(qs, ks_, vs)
    assert "shard_map" in text or "sdy.manual_computation" in text, "kernel not in shard_map"
    assert got[0].sharding.is_equivalent_to(heads, 4), got[0].sharding
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6)

    # Already inside a shard_map over every axis: the kernel is called directly.
    nested = jax.shard_map(
        lambda q, k, v, p, s: pallas_attention(q, k, v, Mask(p, p, s, s, strict=True, window=6),
                                               **blocks),
        mesh=mesh,
        in_specs=(P(("data", "fsdp"), None, "tensor"),) * 3 + (P(("data", "fsdp")),) * 2,
        out_specs=P(("data", "fsdp"), None, "tensor"),
        check_vma=False,
    )
    out = jax.jit(nested).lower(q, k, v, pos, seg).compile(fast)(q, k, v, pos, seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=1e-6, rtol=1e-6)

    # The TPU (Mosaic) kernels per shard, in the TPU interpreter: same numbers.
    tpu = functools.partial(pallas_attention, platform="tpu", interpret=True)
    tpu = jax.jit(functools.partial(fwd_bwd, tpu))
    with jax.set_mesh(mesh):
        assert "kvshare_flash_tpu_dkv" in str(jax.make_jaxpr(tpu)(qs, ks_, vs))
        got = tpu.lower(qs, ks_, vs).compile(fast)(qs, ks_, vs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6)
    print("SHARDED_OK")
    """
)


def test_sharded_matches_unsharded():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-4000:]
