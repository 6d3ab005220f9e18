"""The transformer: plain-transformer parity, parameter counts, exact KV-sharing
semantics (parallel iteration == sequential evaluation), no future leakage, gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinymodel import VOCAB, L, small_config

from kvshare_jax.layout import from_spec
from kvshare_jax.model import (
    ModelConfig,
    Transformer,
    count_params,
    forward,
    init_params,
    sequential_logits,
)

T = 12
PRESET_SPECS = [
    f"{p}-{q}:3" for p in ("pizza", "sandwich", "lasagna") for q in ("bottom", "top", "middle")
]
METHOD_SPECS = ["standard", "yoco", "cla:2", "lckv:1", "mlkv:2", "0_3_0_3_4_5", "2_3_2_3_5_5"]


def tokens(seed: int = 1, batch: int = 2, length: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


@functools.cache
def jitted_forward(cfg: ModelConfig):
    return jax.jit(functools.partial(forward, cfg))


# ------------------------------------------------ an independent plain Llama
def plain_llama(cfg: ModelConfig, params, toks):
    """Textbook Llama forward written from scratch over the param dict."""
    p = params["params"]
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.hd
    b, t = toks.shape

    def norm(x, scale):
        return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * scale

    half = h // 2
    freq = 1.0 / cfg.rope_theta ** (np.arange(half) * 2 / h)
    ang = np.arange(t)[:, None] * freq[None, :]  # [t, h/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rot(x):  # rotate pairs (x_i, x_{i+h/2})
        a, c = x[..., :half], x[..., half:]
        return jnp.concatenate([a * cos - c * sin, c * cos + a * sin], -1)

    x = p["embed"]["embedding"][toks]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        lp = p[f"layer_{i}"]
        hx = norm(x, lp["attn_norm"]["scale"])
        q = rot((hx @ lp["q_proj"]["kernel"]).reshape(b, t, n, h))
        kk = rot((hx @ lp["k_proj"]["kernel"]).reshape(b, t, k, h))
        vv = (hx @ lp["v_proj"]["kernel"]).reshape(b, t, k, h)
        kk, vv = jnp.repeat(kk, n // k, axis=2), jnp.repeat(vv, n // k, axis=2)
        s = jnp.einsum("bqnh,bknh->bnqk", q, kk) / np.sqrt(h)
        a = jax.nn.softmax(jnp.where(causal, s, -1e30), axis=-1)
        o = jnp.einsum("bnqk,bknh->bqnh", a, vv).reshape(b, t, n * h)
        x = x + o @ lp["o_proj"]["kernel"]
        hx = norm(x, lp["mlp_norm"]["scale"])
        gate = hx @ lp["gate_proj"]["kernel"]
        x = x + (jax.nn.silu(gate) * (hx @ lp["up_proj"]["kernel"])) @ lp["down_proj"]["kernel"]
    x = norm(x, p["final_norm"]["scale"])
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


@pytest.mark.parametrize("tie", [False, True])
def test_standard_layout_equals_plain_transformer(tie):
    cfg = small_config("standard", tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    ours = jitted_forward(cfg)(params, toks)
    np.testing.assert_allclose(ours, plain_llama(cfg, params, toks), atol=1e-5, rtol=1e-5)


def test_transformer_apply_is_refused_with_the_entry_points():
    cfg = small_config("standard")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(TypeError, match=r"model\.forward\(cfg, params, tokens\)"):
        Transformer(cfg).apply(params, tokens())


def test_parameter_counts():
    d, n, k, h, f, v = 64, 4, 2, 16, 96, VOCAB
    per_layer = d * n * h * 2 + 2 * d * k * h + 3 * d * f + 2 * d
    standard = count_params(init_params(small_config("standard"), jax.random.key(0)))
    assert standard == 2 * v * d + L * per_layer + d
    for spec in PRESET_SPECS + ["cla:2", "lckv:1"]:
        cfg = small_config(spec)
        params = init_params(cfg, jax.random.key(0))
        missing = L - cfg.layout.num_kv_layers
        assert count_params(params) == standard - missing * 2 * d * k * h, spec
        for i in range(L):
            assert ("k_proj" in params["params"][f"layer_{i}"]) == cfg.layout.is_kv_layer(i)


@pytest.mark.parametrize("spec", PRESET_SPECS + METHOD_SPECS)
def test_parallel_iteration_equals_sequential(spec):
    cfg = small_config(spec, forward_passes=T - 2, backward_passes=2)
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    parallel = jitted_forward(cfg)(params, toks)
    reference = sequential_logits(cfg, params, toks)
    assert float(jnp.max(jnp.abs(parallel - reference))) < 1e-4
    default = jitted_forward(small_config(spec))(params, toks)  # m=7, b=2
    assert bool(jnp.all(jnp.isfinite(default)))


def test_too_few_iterations_do_not_match_sequential():
    """Sanity check that the parity test can fail: one pass leaves upper KVs at zero."""
    cfg = small_config("pizza-top:2", forward_passes=0, backward_passes=1)
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    diff = jnp.abs(jitted_forward(cfg)(params, toks) - sequential_logits(cfg, params, toks))
    assert float(jnp.max(diff)) > 1e-3
    assert float(jnp.max(diff[:, 0])) < 1e-5  # position 0 never reads upper KVs


@pytest.mark.parametrize("spec", PRESET_SPECS + METHOD_SPECS)
def test_no_future_leakage(spec):
    cfg = small_config(spec)
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    changed = toks.at[:, 5].set((toks[:, 5] + 1) % VOCAB)
    fwd = jitted_forward(cfg)
    a, b = fwd(params, toks), fwd(params, changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(a[:, 5:] - b[:, 5:]))) > 1e-4


def _loss(cfg, params, toks, **kw):
    logits = forward(cfg, params, toks, **kw)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))


def test_first_m_iterations_carry_no_gradient():
    """grad with (m, b) == grad when the m-th iterate is injected as a constant."""
    cfg = small_config("sandwich-middle:3")
    (block,) = cfg.layout.cyclic_blocks
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    m, b = cfg.forward_passes, cfg.backward_passes
    _, kv_m = forward(cfg, params, toks, passes=(0, m), return_kv=True)
    upward = {j: kv_m[j] for j in set(cfg.layout.targets[i] for i in block.layers) if j > 0}
    full = jax.grad(lambda p: _loss(cfg, p, toks))(params)
    injected = jax.grad(lambda p: _loss(cfg, p, toks, passes=(0, b), init_kv=upward))(params)
    for a, c in zip(jax.tree.leaves(full), jax.tree.leaves(injected), strict=True):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5)
    # A forward with gradient through all m + b passes would differ:
    through_all = jax.grad(lambda p: _loss(cfg, p, toks, passes=(0, m + b)))(params)
    diffs = [
        float(jnp.max(jnp.abs(a - c)))
        for a, c in zip(jax.tree.leaves(full), jax.tree.leaves(through_all), strict=True)
    ]
    assert max(diffs) > 1e-6


def test_upward_targets_get_gradient_through_upward_reads_with_b2():
    """With b >= 2 the upward target's K/V projections receive gradient through the
    layers below that read them; with b = 1 those reads are stopped values."""
    cfg = small_config("pizza-top:2")  # 0_5_5_5_5_5: layers 1..4 read layer 5 upward
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()

    def kgrad(b):
        g = jax.grad(lambda p: _loss(cfg, p, toks, passes=(cfg.forward_passes, b)))(params)
        return g["params"]["layer_5"]["k_proj"]["kernel"]

    g1, g2 = kgrad(1), kgrad(2)
    assert float(jnp.max(jnp.abs(g2))) > 0
    assert float(jnp.max(jnp.abs(g2 - g1))) > 1e-3 * float(jnp.max(jnp.abs(g2)))


@pytest.mark.parametrize("spec", ["standard", "sandwich-middle:3"])
def test_remat_recomputes_layers_with_the_same_loss_and_gradients(spec):
    """``remat=True`` wraps every layer in ``jax.checkpoint`` (seen in the jaxpr) and
    changes neither the loss nor any gradient."""
    cfg = small_config(spec)
    params = init_params(cfg, jax.random.key(0))
    toks = tokens()
    remat = dataclasses.replace(cfg, remat=True)
    grad = jax.value_and_grad(lambda c, p: _loss(c, p, toks), argnums=1)
    jaxpr = str(jax.make_jaxpr(lambda p: grad(remat, p))(params))
    assert jaxpr.count("remat") >= L and "remat" not in str(
        jax.make_jaxpr(lambda p: grad(cfg, p))(params)
    )
    (loss, g), (loss_r, g_r) = grad(cfg, params), grad(remat, params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
        np.testing.assert_allclose(c, a, atol=1e-6, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        small_config("standard", num_kv_heads=3)
    with pytest.raises(ValueError, match="sliding_window"):
        small_config("yoco", sliding_window=0)
    with pytest.raises(ValueError, match="backward_passes"):
        small_config("standard", backward_passes=0)
    with pytest.raises(ValueError, match="expected 6"):
        ModelConfig.create(from_spec("standard", 4), 6)
