"""Pallas kernels: flash attention with the KV-sharing position masks."""

from kvshare_jax.kernels.flash_attention import flash_attention
from kvshare_jax.kernels.sharded import pallas_attention

__all__ = ["flash_attention", "pallas_attention"]
