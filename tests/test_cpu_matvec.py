"""The FFI matvec of batch-1 CPU decode: values, routing, gradients, decode parity,
other-platform lowering and the fallback without a compiler."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvshare_jax import decode
from kvshare_jax.kernels import cpu_matvec
from kvshare_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.skipif(not cpu_matvec.available(), reason="no C++ compiler")


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1, 1), (1, 3, 7), (1, 64, 8), (1, 65, 33), (1, 512, 1376), (2, 130, 1000),
     (3, 200, 17), (5, 64, 9), (8, 129, 64), (1, 1376, 512),
     # up to 8 rows: sweeps of 4 weight rows (and a rest); more: chunks of 128 columns
     # split between the threads (and a partial one), strips of 16 and 8 columns and a rest
     # of single columns, blocks of up to 6 rows (13 = 4 + 4 + 5, 64 = 11 blocks), blocks
     # of 256 weight rows (and a rest)
     (9, 70, 300), (16, 512, 520), (32, 130, 1001), (64, 64, 257), (13, 1000, 7),
     (7, 600, 1001), (32, 1376, 536), (6, 257, 24), (2, 513, 15), (20, 300, 4000)],
)  # fmt: skip
def test_matvec_matches_float64(m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_matvec.matvec)(x, w))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_matvec_keeps_leading_dims_and_vmaps():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 20)), jnp.float32)
    assert cpu_matvec.matvec(x, w).shape == (1, 1, 20)
    ws = jnp.stack([w, 2 * w, -w])
    got = jax.vmap(cpu_matvec.matvec, in_axes=(None, 0))(x, ws)
    np.testing.assert_allclose(got, jnp.einsum("abk,wkn->wabn", x, ws), rtol=1e-5, atol=1e-5)


def test_matvec_rejects_bad_shapes_in_one_line():
    with pytest.raises(ValueError, match="1..64 rows"):
        cpu_matvec.matvec(jnp.ones((65, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"w \[K, N\]"):
        cpu_matvec.matvec(jnp.ones((1, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="float32 only"):
        cpu_matvec.matvec(jnp.ones((1, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))


def _dense_hlo(cfg: ModelConfig, tokens: int) -> str:
    from kvshare_jax.model import BoundModel

    params = init_params(cfg, jax.random.key(0))
    x = jnp.ones((1, tokens, cfg.d_model), jnp.float32)
    return jax.jit(lambda p, x: BoundModel(cfg, p).logits(x)).lower(params, x).as_text()


def test_max_rows_follows_the_isa(monkeypatch):
    """Single rows only where the kernel is built with AVX-512; up to 32 rows with AVX2."""
    cpu_matvec.max_rows.cache_clear()
    monkeypatch.setattr(cpu_matvec, "_cpu_id", lambda: "model name: x flags: avx2 avx512f")
    try:
        assert cpu_matvec.max_rows() == cpu_matvec.MAX_ROWS_AVX512 == 1
        cpu_matvec.max_rows.cache_clear()
        monkeypatch.setenv("KVSHARE_CPU_ISA", "avx2")
        assert cpu_matvec.max_rows() == cpu_matvec.MAX_ROWS_AVX2 == 32
        cpu_matvec.max_rows.cache_clear()
        monkeypatch.delenv("KVSHARE_CPU_ISA")
        monkeypatch.setattr(cpu_matvec, "_cpu_id", lambda: "model name: x flags: avx2 fma")
        assert cpu_matvec.max_rows() == 32
    finally:
        cpu_matvec.max_rows.cache_clear()


def test_routing_few_rows_fp32_only():
    cfg = ModelConfig.create("standard", num_layers=2, vocab_size=300, d_model=64,
                             num_heads=4, num_kv_heads=2, d_ff=96)  # fmt: skip
    assert "kvshare_matvec" in _dense_hlo(cfg, 1)
    rows = cpu_matvec.max_rows()
    assert ("kvshare_matvec" in _dense_hlo(cfg, rows)) and rows in (1, 32)
    assert "kvshare_matvec" not in _dense_hlo(cfg, rows + 1)  # more rows: XLA
    xla = ModelConfig.create("standard", num_layers=2, vocab_size=300, d_model=64,
                             num_heads=4, num_kv_heads=2, d_ff=96, matvec_impl="xla")  # fmt: skip
    assert "kvshare_matvec" not in _dense_hlo(xla, 1)
    x, w = jnp.ones((1, 8)), jnp.ones((8, 4))
    assert cpu_matvec.use_kernel(x, w)
    assert not cpu_matvec.use_kernel(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="matvec_impl"):
        ModelConfig.create("standard", num_layers=2, matvec_impl="fast")


def test_no_kernel_under_a_multi_device_mesh():
    """Sharded programs keep XLA's dots (the kernel has no partitioning rule)."""
    from jax.sharding import AbstractMesh, AxisType

    x, w = jax.ShapeDtypeStruct((1, 8), jnp.float32), jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert cpu_matvec.use_kernel(x, w)
    for n in (1, 2):
        mesh = AbstractMesh((n,), ("data",), axis_types=(AxisType.Explicit,))
        with jax.sharding.use_abstract_mesh(mesh):
            assert cpu_matvec.use_kernel(x, w) == (n == 1)


def test_gradient_through_the_kernel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 1, 24)), jnp.float32)[:, :1]  # 1 row
    w = jnp.asarray(rng.standard_normal((24, 10)), jnp.float32)
    dims = (((x.ndim - 1,), (0,)), ((), ()))

    def loss(dot, x, w):
        return jnp.sum(jnp.sin(dot(x, w, dims)))

    got = jax.grad(lambda x, w: loss(cpu_matvec.dot_general, x, w), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(jax.lax.dot_general, x, w), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["standard", "sandwich-middle:2", "lckv:1"])
def test_batch1_decode_matches_xla_dots(layout):
    """Generated tokens identical and logits within fp32 summation-order noise."""
    kw = dict(num_layers=4, vocab_size=500, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96)
    outs = []
    for impl in ("auto", "xla"):
        cfg = ModelConfig.create(layout, matvec_impl=impl, **kw)
        params = init_params(ModelConfig.create(layout, **kw), jax.random.key(3))
        fn = decode.generate_fn(cfg, max_new_tokens=12, return_logits=True)
        prompts = jnp.asarray([[5, 9, 2, 7, 1, 3]], jnp.int32)
        out, _ = fn(params, decode.init_cache(cfg, 1, 17), prompts, jnp.asarray([6]),
                    jax.random.key(0))  # fmt: skip
        outs.append(out)
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_other_platforms_lower_xla_dots(platform):
    """A batch-1 decode step lowered for TPU or GPU from this CPU host has no CPU kernel
    (the routing goes through lax.platform_dependent)."""
    cfg = ModelConfig.create("standard", num_layers=2, vocab_size=300, d_model=64,
                             num_heads=4, num_kv_heads=2, d_ff=96)  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    cache = decode.init_cache(cfg, 1, 8)
    step = jax.jit(lambda p, c, t: decode.decode_step(cfg, p, c, t))
    tok = jnp.zeros((1,), jnp.int32)
    assert "kvshare_matvec" in step.lower(params, cache, tok).as_text()
    text = step.trace(params, cache, tok).lower(lowering_platforms=(platform,)).as_text()
    assert "kvshare_matvec" not in text


def test_without_a_compiler_falls_back_with_one_warning(tmp_path):
    code = textwrap.dedent(
        """
        import warnings
        import jax.numpy as jnp
        from kvshare_jax.kernels import cpu_matvec
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_matvec.available()
            assert not cpu_matvec.use_kernel(jnp.ones((1, 8)), jnp.ones((8, 4)))
        assert len(caught) == 1 and "using XLA dots" in str(caught[0].message), caught
        print("fallback ok")
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fallback ok" in done.stdout
    env = {**os.environ, "KVSHARE_CPU_MATVEC": "0", "JAX_PLATFORMS": "cpu"}
    code = "from kvshare_jax.kernels import cpu_matvec; assert not cpu_matvec.available()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
