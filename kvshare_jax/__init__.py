"""kvshare_jax: cross-layer KV-cache sharing experiments in JAX/Flax."""

from kvshare_jax.layout import KVLayout, from_spec

__all__ = ["KVLayout", "from_spec"]
__version__ = "0.1.0"
