"""The full model with ``attention_impl="pallas"`` (interpret mode on CPU) against XLA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvshare_jax.model import ModelConfig, forward, init_params


@pytest.mark.parametrize("spec", ["lasagna-bottom:2", "sandwich-middle:2"])  # down, up
def test_pallas_model_matches_xla_logits_and_gradients(spec):
    cfg = ModelConfig.create(
        spec,
        4,
        vocab_size=53,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        d_ff=48,
        forward_passes=2,
        backward_passes=2,
    )
    params = init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 11), 0, 53)

    def loss_and_logits(impl):
        c = dataclasses.replace(cfg, attention_impl=impl)

        def loss(p):
            logits = forward(c, p, toks)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_x, logits_x), grad_x = loss_and_logits("xla")
    (loss_p, logits_p), grad_p = loss_and_logits("pallas")
    np.testing.assert_allclose(logits_p, logits_x, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss_p, loss_x, atol=1e-6, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_x), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
