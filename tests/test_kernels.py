"""Pallas flash attention (interpret mode on CPU) against the XLA reference.

Every case checks the forward output and dq, dk, dv (``jax.vjp`` with a random
cotangent). Shapes are tiny and the batch rows carry different position patterns so one
compilation covers many scenarios: row 0 starts at position 0 (under ``strict`` its first
query sees nothing), row 1 has its queries at the end of the keys and padded keys
(``INVALID_POS``), row 2 has shuffled key positions with two invalid slots.
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

from kvshare_jax.attention import INVALID_POS, attention, attention_mask, xla_attention
from kvshare_jax.kernels import pallas_attention
from kvshare_jax.kernels.flash_attention import block_size, padded_head_dim

REPO = Path(__file__).resolve().parents[1]


def _positions(t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q_pos = np.stack([np.arange(t), np.arange(t) + s - t, np.arange(t) + (s - t) // 2])
    kv_pos = np.stack([np.arange(s)] * 3)
    kv_pos[1, -3:] = INVALID_POS
    kv_pos[2] = rng.permutation(s)
    kv_pos[2, rng.choice(s, 2, replace=False)] = INVALID_POS
    return q_pos.astype(np.int32), kv_pos.astype(np.int32)


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


def _fwd_bwd(fn, q, k, v, ct, q_pos, kv_pos, **kwargs):
    """``(out, dq, dk, dv)`` of ``fn`` with cotangent ``ct``."""

    def f(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_pos, kv_pos, **kwargs), q, k, v)
        return (out, *vjp(ct))

    return _compile_and_run(f, q, k, v, ct)


CASES = [
    # name,          strict, window, n, kh, t, s, h, dtype, block_q, block_k
    ("causal-g1", False, None, 2, 2, 37, 37, 32, jnp.float32, 8, 16),
    ("strict-g2", True, None, 4, 2, 13, 29, 16, jnp.float32, 8, 8),
    ("window-g4-h20", False, 5, 8, 2, 19, 40, 20, jnp.float32, 16, 8),
    ("window-strict-g2", True, 7, 4, 2, 24, 24, 16, jnp.float32, 16, 16),
    ("causal-g4-bf16", False, None, 4, 1, 21, 35, 32, jnp.bfloat16, 16, 8),
]


@pytest.mark.parametrize(
    "strict, window, n, kh, t, s, h, dtype, block_q, block_k",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_matches_reference(strict, window, n, kh, t, s, h, dtype, block_q, block_k):
    q, k, v, ct = _inputs(t, s, n, kh, h, dtype)
    q_pos, kv_pos = _positions(t, s)
    kernel = functools.partial(pallas_attention, block_q=block_q, block_k=block_k)
    got = _fwd_bwd(kernel, q, k, v, ct, q_pos, kv_pos, strict=strict, window=window)
    want = _fwd_bwd(xla_attention, q, k, v, ct, q_pos, kv_pos, strict=strict, window=window)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == w.dtype == dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol, err_msg=name
        )

    # Rows that see no key: output and dq exactly zero (strict: row 0 / position 0).
    empty = ~np.asarray(attention_mask(q_pos, kv_pos, strict=strict, window=window)).any(-1)
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
    kwargs = dict(strict=strict, window=window)
    got = _compile_and_run(
        lambda q, k, v: attention(q, k, v, q_pos, kv_pos, **kwargs, impl="pallas"), q, k, v
    )
    want = jax.jit(lambda q, k, v: xla_attention(q, k, v, q_pos, kv_pos, **kwargs))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)  # length 1: strict hides its only key


def test_block_and_head_dim_rules():
    assert block_size(None, 5, "gpu", "q") == 16  # minimum Triton tile
    assert block_size(None, 300, "gpu", "k") == 128
    assert block_size(64, 40, "gpu", "k") == 64  # next power of two covering 40
    assert block_size(None, 1000, "tpu", "k") == 128
    assert block_size(None, 40, "tpu", "k") == 40  # one full-array tile
    assert block_size(None, 8, "interpret", "q") == 8
    assert block_size(None, 100, "interpret", "q") == 32
    assert [padded_head_dim(h, "gpu") for h in (8, 64, 80)] == [16, 64, 128]
    assert [padded_head_dim(h, "tpu") for h in (64, 128, 200)] == [128, 128, 256]
    assert padded_head_dim(20, "interpret") == 24
    with pytest.raises(ValueError, match="power of two"):
        block_size(48, 100, "gpu", "q")
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(64, 1000, "tpu", "k")
    with pytest.raises(ValueError, match="positive int"):
        block_size(0, 100, "interpret", "q")


def _bad(**changes):
    args = dict(
        q=jnp.zeros((2, 5, 4, 16)),
        k=jnp.zeros((2, 7, 2, 16)),
        v=jnp.zeros((2, 7, 2, 16)),
        q_pos=jnp.zeros((2, 5), jnp.int32),
        kv_pos=jnp.zeros((2, 7), jnp.int32),
    )
    kwargs = {name: changes.pop(name) for name in list(changes) if name not in args}
    args.update(changes)
    return args, kwargs


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
        (dict(q=jnp.zeros((2, 5, 64))), "expected q"),
        (dict(window=0), "window must be"),
        (dict(block_k=-8), "positive int"),
        (dict(interpret=False), "pass interpret=True"),
    ],
)
def test_clear_errors(changes, match):
    args, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        pallas_attention(**args, **kwargs)


def test_sharding_divisibility_error():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    args, _ = _bad()
    with pytest.raises(ValueError, match="cannot shard attention"):
        pallas_attention(**args, mesh=mesh)  # batch 2 over data*fsdp = 4


SHARDED_SCRIPT = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from kvshare_jax.kernels import flash_attention, pallas_attention

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    b, t, n, kh, h = 4, 16, 4, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, ct = (jax.random.normal(x, (b, t, n, h)) for x in ks[:2])
    k, v = (jax.random.normal(x, (b, t, kh, h)) for x in ks[2:])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def fwd_bwd(fn, q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pos, pos, strict=True, window=6), q, k, v)
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
        lambda q, k, v, p: pallas_attention(q, k, v, p, p, strict=True, window=6, **blocks),
        mesh=mesh,
        in_specs=(P(("data", "fsdp"), None, "tensor"),) * 3 + (P(("data", "fsdp")),),
        out_specs=P(("data", "fsdp"), None, "tensor"),
        check_vma=False,
    )
    out = jax.jit(nested).lower(q, k, v, pos).compile(fast)(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=1e-6, rtol=1e-6)
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
