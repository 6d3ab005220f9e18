"""The flash-attention kernels built for real accelerators on this CPU host.

TPU: compiled by the TPU compiler (Mosaic) for compile-only topologies
(``jax.experimental.topologies``; needs libtpu). A VMEM overflow fails the compile
(``E1001: CompileTimeScopedVmemOom``), as did the Triton-style kernel for the TinyLlama
gradient and for the 32k forward; both shapes are in the default run. GPU: the Triton
kernels are lowered for CUDA (``lowering_platforms=("cuda",)``), not compiled by Triton.

Shapes: b batch, t query length, s key length, n query heads, kh KV heads, h head dim.
The default run compiles a few shapes on v5e; the grid over generations (v4, v5e, v5p,
v6e), contexts up to 32k, GQA groups up to 8, h in {32, 64, 128} and the mask variants
is ``slow``.
"""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshare_jax import aot
from kvshare_jax.kernels import flash_attention, flash_cache_attention, flash_tpu, pallas_attention
from kvshare_jax.masks import Mask
from kvshare_jax.target import target_device_kind, target_platform

if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    # Compile-only topologies on a host without TPUs: tell libtpu what its host probe would
    # look up, and let it load while another process (e.g. a benchmark) holds its lockfile.
    for name, value in {
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_ACCELERATOR_TYPE": "v5litepod-4",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }.items():
        os.environ.setdefault(name, value)

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed"
)

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
TPU_KERNELS = {
    "fwd": {"kvshare_flash_tpu_fwd"},
    "bwd": {"kvshare_flash_tpu_fwd", "kvshare_flash_tpu_dq", "kvshare_flash_tpu_dkv"},
    "decode": {"kvshare_flash_tpu_fwd"},  # time-major K/V: the folded kernels
    "cache": {"kvshare_flash_tpu_decode"},  # time-minor cache slots, read in place
}


@functools.cache
def _devices(gen: str):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[gen])
    return tuple(topo.devices)


def _args(b, t, s, n, kh, h, dtype, sharding=None, cache=None, segments=False):
    """``(q, k, v, q_pos, kv_pos)``, with ``segments`` also ``(q_seg, kv_seg)``."""

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    # cache slots viewed per batch row: HS [b, kh, h, s], SH [b, kh, s, h]
    kv = {None: (b, s, kh, h), "HS": (b, kh, h, s), "SH": (b, kh, s, h)}[cache]
    mask = (sds((b, t), jnp.int32), sds((b, s), jnp.int32)) * (2 if segments else 1)
    return (sds((b, t, n, h), dtype), sds(kv, dtype), sds(kv, dtype), *mask)


def _fn(attn, mode: str, strict=False, window=None, **kwargs):
    """``(q, k, v, q_pos, kv_pos[, q_seg, kv_seg]) -> out`` (fwd, decode) or
    ``-> (dq, dk, dv)`` (bwd): ``attn`` under ``Mask(...)`` with ``strict``, ``window``."""

    def fa(q, k, v, *m):
        return attn(q, k, v, Mask(*m, strict=strict, window=window), **kwargs)

    if mode != "bwd":
        return fa

    def grads(q, k, v, *m):
        def loss(q, k, v):
            return fa(q, k, v, *m).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return grads


def _kernels(text: str) -> set[str]:
    return set(re.findall(r"kvshare_flash_tpu_[a-z]+", text))


def _compile_tpu(gen, mode, b, t, s, n, kh, h, dtype, strict=False, window=None, segments=False):
    """Mosaic-compile ``mode`` for one device of ``gen`` (``segments``: the mask has
    segment ids); checks the kernels and the output shapes, returns the compiled
    executable."""
    dev = _devices(gen)[0]
    where = jax.sharding.SingleDeviceSharding(dev)
    cache = "HS" if mode == "cache" else None
    args = _args(b, t, s, n, kh, h, dtype, where, cache=cache, segments=segments)
    attn = flash_attention
    if mode == "cache":
        attn = functools.partial(flash_cache_attention, layout="HS")
    fn = _fn(
        attn,
        mode,
        strict=strict,
        window=window,
        platform="tpu",
        device_kind=dev.device_kind,
    )
    lowered = jax.jit(fn).lower(*args)
    text = lowered.as_text()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the lowered program"
    assert _kernels(text) == TPU_KERNELS[mode]
    compiled = lowered.compile()  # raises on Mosaic errors, e.g. E1001 (VMEM OOM)
    outs = jax.tree.leaves(compiled.out_info)
    shapes = [(b, t, n, h)] if mode != "bwd" else [(b, t, n, h), (b, s, kh, h), (b, s, kh, h)]
    assert [(o.shape, o.dtype) for o in outs] == [(sh, jnp.dtype(dtype)) for sh in shapes]
    return compiled


bf16, f32 = jnp.bfloat16, jnp.float32
DEFAULT_TPU = [
    # name, mode, b, t, s, n, kh, h, dtype
    ("tinyllama-grad", "bwd", 1, 2048, 2048, 32, 4, 64, bf16),  # was E1001
    ("32k-fwd-h128", "fwd", 1, 32768, 32768, 8, 8, 128, bf16),  # was E1001
    ("cpu-study-grad-h32", "bwd", 4, 128, 128, 4, 2, 32, f32),
    ("tinyllama-grad-seg", "bwd", 1, 2048, 2048, 32, 4, 64, bf16),  # packed rows
    ("llama110m-cache-seg", "cache", 8, 1, 1024, 12, 6, 64, bf16),  # packed prompts
]


@needs_libtpu
@pytest.mark.parametrize(
    "mode, b, t, s, n, kh, h, dtype", [c[1:] for c in DEFAULT_TPU], ids=[c[0] for c in DEFAULT_TPU]
)
def test_tpu_compiles_v5e(mode, b, t, s, n, kh, h, dtype, request):
    segments = request.node.callspec.id.endswith("-seg")
    _compile_tpu("v5e", mode, b, t, s, n, kh, h, dtype, strict=segments, segments=segments)


@needs_libtpu
@pytest.mark.parametrize("h, segments", [(64, False), (128, False), (64, True)])
def test_tpu_decode_reads_cache_in_place(h, segments):
    """Decode at 32k over time-minor cache slots: compiles for h = 64 and 128 (and with
    the segment ids of packed prompts), and XLA allocates no temporary anywhere near the
    cache's size and copies no slot."""
    b, s, kh = 8, 32768, 8
    compiled = _compile_tpu(
        "v5e", "cache", b, 1, s, 32, kh, h, bf16, strict=True, window=4096, segments=segments
    )
    cache_bytes = 2 * b * s * kh * h * 2
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes // 100
    assert aot.cache_copies(compiled.as_text(), b * kh * s * h * 2 // 4, s) == 0


GRID = [
    # (mode, b, t, s, n, kh, h, dtype, strict, window): configs' shapes, then long
    # contexts with GQA groups 1-8, h in {32, 64, 128}, every mask variant, decode.
    ("bwd", 1, 2048, 2048, 32, 4, 64, bf16, False, None),  # tinyllama_1b
    ("bwd", 2, 1024, 1024, 12, 6, 64, bf16, False, None),  # llama_110m
    ("bwd", 2, 2048, 2048, 8, 8, 64, f32, False, None),  # llama_tiny
    ("bwd", 4, 128, 128, 4, 2, 32, f32, True, None),  # study/cpu, tiny (strict)
    ("bwd", 4, 256, 256, 4, 2, 32, bf16, False, 64),
    ("bwd", 1, 2048, 2048, 32, 4, 64, bf16, True, 512),
    ("fwd", 1, 32768, 32768, 8, 8, 128, bf16, False, None),
    ("bwd", 1, 32768, 32768, 8, 8, 128, bf16, False, None),
    ("bwd", 1, 32768, 32768, 32, 4, 64, bf16, False, None),
    ("bwd", 1, 32768, 32768, 16, 2, 32, f32, True, 4096),
    ("bwd", 1, 32768, 32768, 16, 2, 128, f32, False, 8192),
    ("fwd", 2, 16, 32768, 32, 4, 64, bf16, False, None),  # prefill chunk
    ("decode", 8, 1, 2048, 32, 4, 64, bf16, False, None),
    ("cache", 8, 1, 2048, 32, 4, 64, bf16, False, None),  # tinyllama_1b
    ("cache", 64, 1, 1024, 12, 6, 64, bf16, True, None),  # llama_110m
    ("cache", 4, 1, 256, 4, 2, 32, f32, True, None),
    ("cache", 8, 1, 32768, 8, 8, 128, bf16, False, None),
    ("cache", 8, 1, 32768, 32, 4, 128, bf16, True, 4096),
    ("cache", 8, 1, 32768, 32, 4, 64, bf16, False, None),
    ("cache", 8, 1, 32768, 16, 2, 32, f32, False, 1024),
]
# the same shapes with segment ids (packed documents): one per mode and mask variant
GRID += [(*c, True) for c in GRID if c[0] in ("bwd", "fwd", "cache") and c[2] in (2048, 1)][:6]


def _grid_id(case) -> str:
    mode, b, t, s, n, kh, h, dtype, strict, window, *seg = case
    name = f"{mode}-b{b}-t{t}-s{s}-n{n}-kh{kh}-h{h}-{jnp.dtype(dtype).name}"
    name += ("-strict" if strict else "") + (f"-w{window}" if window else "")
    return name + ("-seg" if seg else "")


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("gen", sorted(TOPOLOGIES))
@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_tpu_compiles_grid(gen, case):
    _compile_tpu(gen, *case[:10], segments=len(case) > 10)


@needs_libtpu
@pytest.mark.parametrize("gen", sorted(TOPOLOGIES))
def test_topology_device_kinds_have_blocks(gen):
    """The device kinds of the compile-only topologies map to their generation."""
    kind = _devices(gen)[0].device_kind
    assert flash_tpu.generation(kind) == gen, kind


@needs_libtpu
def test_target_is_the_mesh_not_the_host():
    """Under ``jax.set_mesh`` over TPU devices (a v5e topology, on this CPU host),
    ``pallas_attention`` with no platform builds the Mosaic kernels, per shard."""
    devices = np.asarray(_devices("v5e")).reshape(2, 1, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    heads = NamedSharding(mesh, P("data", None, "tensor", None))
    pos = NamedSharding(mesh, P("data", None))
    b, t, n, kh, h = 2, 1024, 8, 2, 64
    arrays = _args(b, t, t, n, kh, h, bf16, segments=True)
    shardings = (heads, heads, heads, pos, pos, pos, pos)
    args = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        for x, sh in zip(arrays, shardings, strict=True)
    ]
    seen = {}

    def fn(q, k, v, *m):  # packed rows: segment ids sharded with the positions
        seen["platform"], seen["kind"] = target_platform(), target_device_kind()
        return pallas_attention(q, k, v, Mask(*m, strict=True))

    assert jax.default_backend() == "cpu"
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(*args)
    assert seen == {"platform": "tpu", "kind": "TPU v5 lite"}
    text = lowered.as_text()
    assert "tpu_custom_call" in text and _kernels(text) == {"kvshare_flash_tpu_fwd"}
    assert "sdy.manual_computation" in text or "shard_map" in text
    compiled = lowered.compile()
    assert compiled.out_info.shape == (b, t, n, h)


# ----------------------------------------------------------------------------- Triton


def _lower_cuda(mode, b, t, s, n, kh, h, dtype, strict=False, window=None, segments=False) -> str:
    """Lowers for CUDA; ``mode="cache"`` reads SH cache slots, the GPU's layout."""
    attn = flash_attention
    if mode == "cache":
        attn = functools.partial(flash_cache_attention, layout="SH")
    fn = _fn(attn, mode, strict=strict, window=window, platform="gpu")
    cache = "SH" if mode == "cache" else None
    args = _args(b, t, s, n, kh, h, dtype, cache=cache, segments=segments)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # one Triton kernel for the forward; forward, dQ and dK/dV for the gradient
    assert text.count("xla.gpu.triton") == (3 if mode == "bwd" else 1)
    assert not _kernels(text)
    return text


DEFAULT_GPU = [
    ("tinyllama-grad", "bwd", 1, 2048, 2048, 32, 4, 64, bf16),
    ("32k-fwd-h128", "fwd", 1, 32768, 32768, 8, 8, 128, bf16),
    ("llama110m-cache", "cache", 8, 1, 1024, 12, 6, 64, bf16),
    ("tinyllama-grad-seg", "bwd", 1, 2048, 2048, 32, 4, 64, bf16),
    ("llama110m-cache-seg", "cache", 8, 1, 1024, 12, 6, 64, bf16),
]


@pytest.mark.parametrize(
    "mode, b, t, s, n, kh, h, dtype", [c[1:] for c in DEFAULT_GPU], ids=[c[0] for c in DEFAULT_GPU]
)
def test_triton_lowers(mode, b, t, s, n, kh, h, dtype, request):
    segments = request.node.callspec.id.endswith("-seg")
    _lower_cuda(mode, b, t, s, n, kh, h, dtype, strict=segments, segments=segments)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_triton_lowers_grid(case):
    _lower_cuda(*case[:10], segments=len(case) > 10)


# ---------------------------------------------------------------- quantized cache slots
def _quantized_args(b, s, n, kh, h, dtype, cache: str, kv_dtype: str, sharding=None):
    """``(q, k, v, k_scale, v_scale, q_pos, kv_pos)`` of a quantized cache (per-row slots,
    scales ``[b, kh, s]`` fp32)."""

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    kv = (b, kh, h, s) if cache == "HS" else (b, kh, s, h)
    return (
        sds((b, 1, n, h), dtype), sds(kv, kv_dtype), sds(kv, kv_dtype),
        sds((b, kh, s), f32), sds((b, kh, s), f32),
        sds((b, 1), jnp.int32), sds((b, s), jnp.int32),
    )  # fmt: skip


def _quantized_fn(layout: str, **kwargs):
    def fn(q, k, v, k_scale, v_scale, q_pos, kv_pos):
        mask = Mask(q_pos, kv_pos, strict=True)
        return flash_cache_attention(
            q, k, v, mask, layout=layout, scales=(k_scale, v_scale), **kwargs
        )

    return fn


@needs_libtpu
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_tpu_decode_compiles_over_quantized_slots_in_place(kv_dtype):
    """The Mosaic decode kernel over int8 slots and their fp32 scales (dequantized in
    VMEM) compiles for v5e, copies no slot and allocates no cache-sized temporary."""
    b, s, n, kh, h = 8, 8192, 32, 8, 64
    dev = _devices("v5e")[0]
    where = jax.sharding.SingleDeviceSharding(dev)
    args = _quantized_args(b, s, n, kh, h, bf16, "HS", kv_dtype, where)
    fn = _quantized_fn("HS", platform="tpu", device_kind=dev.device_kind)
    lowered = jax.jit(fn).lower(*args)
    assert _kernels(lowered.as_text()) == TPU_KERNELS["cache"]
    compiled = lowered.compile()
    assert compiled.out_info.shape == (b, 1, n, h)
    slot = b * kh * s * h  # int8 bytes
    assert compiled.memory_analysis().temp_size_in_bytes < slot // 10
    assert aot.cache_copies(compiled.as_text(), b * kh * s * 4 // 4, s) == 0  # nor scales


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_triton_lowers_over_quantized_slots(kv_dtype):
    args = _quantized_args(8, 1024, 12, 6, 64, bf16, "SH", kv_dtype)
    fn = _quantized_fn("SH", platform="gpu")
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
