"""Programs compiled for compile-only NVIDIA GPUs (``kvshare_jax.gpu_topology``) on this host.

The real XLA GPU compiler runs against H100/H200 target descriptions, and Triton generates
code for our Pallas kernels: the compiled HLO calls them as
``custom_call_target="__gpu$xla.gpu.triton"``, and a kernel whose blocks overflow shared
memory fails the compile. Skipped without the CUDA plugin (``kvshare_jax[cuda]``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshare_jax import gpu_topology
from kvshare_jax.gpu_topology import GPU_KINDS, gpu_devices, gpu_kind_of, is_gpu_topology
from kvshare_jax.kernels import flash_attention, pallas_attention
from kvshare_jax.masks import Mask

pytestmark = pytest.mark.skipif(
    not gpu_topology.cuda_plugin_installed(),
    reason="the CUDA plugin (jax_plugins.xla_cuda12, kvshare_jax[cuda]) is not installed",
)

TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
# b=2, t=s=128, n=8 query heads, kh=4 KV heads, h=64
SHAPES = [((2, 128, 8, 64), jnp.bfloat16)] + [((2, 128, 4, 64), jnp.bfloat16)] * 2
SHAPES += [((2, 128), jnp.int32)] * 4  # positions, then segment ids of queries and keys


def _args(sharding, segments=False):
    shapes = SHAPES if segments else SHAPES[:5]
    return [jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for shape, dt in shapes]


def _masked(attn):
    """``attn(q, k, v, mask)`` as ``(q, k, v, q_pos, kv_pos[, q_seg, kv_seg])``."""
    return lambda q, k, v, *m: attn(q, k, v, Mask(*m, strict=True))


def _loss_grad(attn):
    def loss(q, k, v, *m):
        return attn(q, k, v, *m).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("name", ["h100:1", "h200:1", "h100:8", " H200:4 "])
def test_good_names(name):
    assert is_gpu_topology(name)


@pytest.mark.parametrize("name", ["h300:1", "h100:0", "h100:9", "h100", "h100:x", "v5e:2x2", ""])
def test_bad_names_raise_one_line(name):
    assert not is_gpu_topology(name)
    with pytest.raises(ValueError) as err:
        gpu_devices(name)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == f"bad GPU topology {name!r}: expected h100:N or h200:N with N in 1..8"


def test_missing_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(gpu_topology, "_PLUGIN_MODULE", "jax_plugins.no_such_plugin")
    with pytest.raises(ValueError) as err:
        gpu_devices.__wrapped__("h100:2")  # past the cache
    assert "\n" not in str(err.value)
    assert "pip install 'kvshare_jax[cuda]'" in str(err.value)


@pytest.mark.parametrize("name,count", [("h100:1", 1), ("h200:1", 1), ("h100:8", 8)])
def test_devices_and_kind(name, count):
    devices = gpu_devices(name)
    assert devices is gpu_devices(name)  # cached
    assert len(devices) == count
    assert {d.platform for d in devices} == {"gpu"}
    assert gpu_kind_of(devices[0]) is GPU_KINDS[name.split(":")[0]]


def test_unknown_device_kind():
    with pytest.raises(ValueError, match="unknown GPU device kind"):
        gpu_kind_of(jax.devices("cpu")[0])


@pytest.mark.parametrize("name", ["h100:1", "h200:1"])
def test_matmul_memory_analysis(name):
    sharding = jax.sharding.SingleDeviceSharding(gpu_devices(name)[0])
    a = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=sharding)
    b = jax.ShapeDtypeStruct((512, 128), jnp.float32, sharding=sharding)
    compiled = jax.jit(lambda x, y: x.astype(jnp.float32) @ y).lower(a, b).compile()
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes == 256 * 512 * 2 + 512 * 128 * 4
    assert mem.output_size_in_bytes == 256 * 128 * 4


@pytest.mark.parametrize("name, segments", [("h100:1", False), ("h200:1", True)])
def test_flash_attention_compiles_through_triton(name, segments):
    """The Triton kernels compile for the GPU, also with segment ids (packed rows)."""
    dev = gpu_devices(name)[0]
    mesh = Mesh(np.array([dev]), ("data",))
    fwd = _masked(lambda q, k, v, m: flash_attention(q, k, v, m, platform="gpu"))

    with jax.set_mesh(mesh):
        args = _args(NamedSharding(mesh, P()), segments)
        text = jax.jit(fwd).lower(*args).compile().as_text()
        assert text.count(TRITON_CALL) == 1
        assert "kvshare_flash_fwd" in text
        text = jax.jit(_loss_grad(fwd)).lower(*args).compile().as_text()
        assert text.count(TRITON_CALL) == 3  # forward (residuals), dq, dk/dv
        for kernel in ("kvshare_flash_fwd", "kvshare_flash_dq", "kvshare_flash_dkv"):
            assert kernel in text


def test_pallas_attention_sharded_on_8_gpus():
    """The target (Triton) is found from the mesh's compile-only GPU devices."""
    mesh = Mesh(np.array(gpu_devices("h100:8")).reshape(2, 4), ("data", "tensor"))
    with jax.set_mesh(mesh):
        qkv = NamedSharding(mesh, P("data", None, "tensor", None))
        pos = NamedSharding(mesh, P("data", None))
        args = [
            jax.ShapeDtypeStruct(shape, dt, sharding=qkv if len(shape) == 4 else pos)
            for shape, dt in SHAPES
        ]
        text = jax.jit(_masked(pallas_attention)).lower(*args).compile().as_text()
    assert text.count(TRITON_CALL) == 1


def test_triton_checks_shared_memory():
    """Triton really generates code for the target: a block over the H100's 227 KiB
    shared memory per block fails the compile."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    sharding = jax.sharding.SingleDeviceSharding(gpu_devices("h100:1")[0])

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

    def matmul(n):  # bf16: an f32 dot at the tests' "highest" precision compiles for minutes
        x = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=sharding)
        call = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((n, n), jnp.float32),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        )
        return jax.jit(call).lower(x, x).compile()

    assert TRITON_CALL in matmul(64).as_text()
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        matmul(512)  # 1 MiB of operand blocks


# ------------------------------------------------------------- kvshare compile
@pytest.fixture
def default_precision():
    """conftest asks for fp32 ("highest") matmuls; Triton then compiles f32 dots for
    minutes. These tests compare no numbers."""
    with jax.default_matmul_precision("default"):
        yield


@pytest.mark.parametrize("name", ["h100:1", pytest.param("h200:1", marks=pytest.mark.slow)])
def test_compile_command_plans_a_gpu(name, tmp_path, capsys, default_precision):
    """``kvshare compile --topology h100:1`` compiles the train step, the generation
    program and a decode step for the GPU (Triton kernels: attention_impl auto) and
    reports the memory account against the GPU's memory; XLA gives no cost analysis."""
    import json

    from kvshare_jax import cli

    path = tmp_path / "plan.json"
    argv = ["compile", "--config", "configs/tiny.py", "--topology", name, "--json", str(path)]
    argv += ["--prompt-len", "16", "--gen-len", "32", "--quiet", "--config.model.dtype=bfloat16"]
    assert cli.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["device_kind"] == GPU_KINDS[name.split(":")[0]].name
    for program in ("train_step", "generate", "decode_step"):
        p = report["programs"][program]
        assert p["fits"] and p["bytes_per_device"]["total"] > p["bytes_per_device"]["arguments"] > 0
        assert p["hbm_bytes_per_device"] == GPU_KINDS[name.split(":")[0]].memory_bytes
    step = report["programs"]["decode_step"]
    assert step["cache_layout"] == "SH" and step["cache_copies"] == 0
    assert step["ratio_to_floor"] is None  # no cost analysis on compile-only GPUs
    assert "| decode_step | yes |" in capsys.readouterr().out


@pytest.mark.parametrize("kv_cache_dtype", ["", "int8"])
def test_gpu_decode_step_reads_the_cache_through_triton(kv_cache_dtype, default_precision):
    """One decode step of llama_110m's shape on an H100: the attention of every layer is a
    Triton kernel over the head-major cache slots (length rounded up to 128; int8 slots
    with their scales), no copy of a slot, temporaries far below the cache."""
    import dataclasses

    from kvshare_jax import aot
    from kvshare_jax.config import load_config, model_config_from

    cfg = model_config_from(load_config("configs/llama_110m.py"))
    cfg = dataclasses.replace(cfg, kv_cache_dtype=kv_cache_dtype)
    device = gpu_devices("h100:1")[0]
    compiled = aot.lower_decode_step(cfg, 8, 1000, device).compile()
    text = compiled.as_text()
    assert text.count(TRITON_CALL) == cfg.num_layers
    cache = aot._cache_shapes(cfg, 8, 1000, device)
    assert cache.layout == "SH" and cache.length == 1024
    account = aot._cache_account(compiled, cache)
    assert account["cache_copies"] == 0 and account["temporaries_over_cache"] < 0.05


def test_bench_max_batch_on_a_gpu(tmp_path, capsys, default_precision):
    """``kvshare bench --topology h100:1``: the max-batch column from the GPU compiler's
    memory account; no decode roofline (no cost analysis), shown as "-"."""
    import json

    from kvshare_jax import cli

    argv = ["bench", "--config", "configs/tiny.py", "--topology", "h100:1", "--layouts"]
    argv += ["standard", "--prompt-len", "4", "--gen-len", "8", "--memory-budget", "64MiB"]
    argv += ["--quiet", "--out-dir", str(tmp_path), "--config.model.dtype=bfloat16"]
    assert cli.main(argv) == 0
    (row,) = json.loads((tmp_path / "max_batch_h100_1.json").read_text())["rows"]
    assert row["max_batch"] > 0 and "max_batch_roofline" not in row
    assert row["max_batch_memory"]["total_bytes"] <= 64 * 2**20
    assert "| standard |" in capsys.readouterr().out
