"""Pallas kernels: flash attention with the KV-sharing position masks.

Shapes: b batch, t query length, s key length, n query heads, kh KV heads, h head dim.
:func:`flash_attention` (single device; Mosaic on TPU, Triton on GPU, interpret mode on
CPU) and :func:`pallas_attention` (per shard under a ('data', 'fsdp', 'tensor') mesh);
their ``*_cache_attention`` twins read decode-cache slots in place.
"""

from kvshare_jax.kernels.flash import flash_attention, flash_cache_attention
from kvshare_jax.kernels.sharded import pallas_attention, pallas_cache_attention

__all__ = [
    "flash_attention",
    "flash_cache_attention",
    "pallas_attention",
    "pallas_cache_attention",
]
