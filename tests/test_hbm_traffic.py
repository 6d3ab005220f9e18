"""The HBM traffic of compiled TPU programs (`kvshare_jax.hbm_traffic`), against programs
whose traffic is known: a matmul reads its weight once, an in-place update moves only the
update, a loop moves its body's bytes per trip, and a decode step at batch 1 reads every
weight once (where XLA's cost analysis counts weights staged in VMEM several times)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the [tpu] extra)")

from kvshare_jax import aot, hbm_traffic
from kvshare_jax.config import load_config, model_config_from
from kvshare_jax.layout import from_spec

MIB = 2**20


@pytest.fixture(autouse=True)
def _default_precision():
    with jax.default_matmul_precision("default"):  # (no fp32 emulation on TPU)
        yield


def _compile(fn, *shapes, donate=()):
    device = aot.topology("v5e:1x1")[0]
    return aot._lower_on(device, jax.jit(fn, donate_argnums=donate), *aot._on(device, shapes))


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_matmul_reads_its_weight_once():
    w, x = _sds((4096, 4096)), _sds((8, 4096))
    traffic = hbm_traffic.hbm_bytes(_compile(jnp.dot, x, w).compile().as_text())
    least = (4096 * 4096 + 2 * 8 * 4096) * 2
    assert least <= traffic <= 1.05 * least


def test_in_place_update_moves_only_the_update():
    def write(buf, row, i):
        return jax.lax.dynamic_update_slice(buf, row, (0, i, 0))

    buf, row = _sds((64, 1024, 128)), _sds((64, 1, 128))
    compiled = _compile(write, buf, row, _sds((), jnp.int32), donate=(0,)).compile()
    traffic = hbm_traffic.hbm_bytes(compiled.as_text())
    assert 0 < traffic <= 4 * 64 * 128 * 2  # the row read, written (and a margin)


def test_gather_reads_rows_not_the_table():
    """(A table that fits VMEM the compiler prefetches whole: traffic, rightly.)"""
    table, ids = _sds((32000, 4096)), _sds((4,), jnp.int32)  # 250 MiB
    traffic = hbm_traffic.hbm_bytes(_compile(lambda t, i: t[i] * 2, table, ids).compile().as_text())
    assert 0 < traffic <= 4 * 4 * 4096 * 2  # four rows read, written (and a margin)


def test_loop_counts_its_trips():
    """A weight larger than VMEM is read from HBM on every trip."""

    def loop(x, w):
        return jax.lax.fori_loop(0, 8, lambda i, x: jnp.tanh(x @ w), x)

    w, x = _sds((8192, 8192)), _sds((8, 8192))  # 128 MiB
    traffic = hbm_traffic.hbm_bytes(_compile(loop, x, w).compile().as_text())
    assert 8 * 128 * MIB <= traffic <= 1.1 * 8 * 128 * MIB


def test_parse_and_errors():
    text = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  ROOT %t = (s32[], f32[4]{0}) tuple(%a, %b)
  %a = s32[] parameter(0)
  %b = f32[4]{0} add(%x, %x)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %v = f32[4]{0:S(1)} negate(%x)
  ROOT %w = f32[4]{0} exponential(%v)
}
"""
    comps, entry = hbm_traffic.parse(text)
    assert entry == "main" and [op.name for op in comps["body"]] == ["a", "b", "t"]
    assert hbm_traffic.hbm_bytes(text) == 16 + 16  # x read (into VMEM), w written
    with pytest.raises(ValueError, match="ENTRY"):
        hbm_traffic.hbm_bytes("HloModule m\n")


def _step(path: str, layout: str, batch: int = 1) -> tuple[dict, int, int]:
    """The decode step's report, the bytes of the weights it multiplies, the cache's."""
    cfg = model_config_from(load_config(path))
    cfg = dataclasses.replace(cfg, layout=from_spec(layout, cfg.num_layers), attention_impl="xla")
    device = aot.topology("v5e:1x1")[0]
    out = aot.decode_step_program(cfg, device, batch, 1023)
    params = jax.eval_shape(functools.partial(aot.init_params, cfg), jax.random.key(0))
    params["params"].pop("embed")  # (one row of it is read per sequence)
    weights = sum(x.size for x in jax.tree.leaves(params)) * jnp.dtype(cfg.dtype).itemsize
    return out, weights, out["cache_bytes_per_device"]


def test_decode_step_at_batch_one_reads_each_weight_once():
    out, weights, cache = _step("configs/llama_110m.py", "lasagna-top:6")
    assert weights <= out["hbm_traffic_per_device"] <= 1.1 * (weights + cache)
    assert out["hbm_traffic_ratio_to_floor"] <= 1.1


@pytest.mark.slow
def test_vmem_staging_is_not_traffic():
    """tinyllama_1b, sandwich-middle: the TPU compiler stages most weights into VMEM, and
    XLA's bytes accessed counts them again and again (1.6x the floor's count); HBM
    traffic is the weights once."""
    out, weights, cache = _step("configs/tinyllama_1b.py", "sandwich-middle:11")
    assert out["ratio_to_floor"] > 1.3  # what cost analysis says
    assert weights <= out["hbm_traffic_per_device"] <= 1.1 * (weights + cache)
    assert out["hbm_traffic_ratio_to_floor"] <= 1.05
