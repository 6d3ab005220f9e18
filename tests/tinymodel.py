"""The tests' tiny model: one base shape, overridden per test (not a test module).

``conftest.py`` serves :func:`small_config` as the ``small_config`` fixture; modules
that need the shape at import time (parametrize lists) import it from here.
"""

from kvshare_jax.model import ModelConfig

L, VOCAB = 6, 97  # layers and vocabulary of the base shape
BASE = dict(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96, max_len=64)


def small_config(spec: str, layers: int = L, **kw) -> ModelConfig:
    """A d=64 model of ``layers`` layers (GQA 4/2, window 4); ``kw`` overrides fields."""
    return ModelConfig.create(spec, layers, **{**BASE, "sliding_window": 4, **kw})
