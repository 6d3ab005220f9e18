"""Ahead-of-time compilation for a TPU slice from any host: memory, cost and a roofline.

``jax.experimental.topologies`` describes a TPU slice (``"v5e:4x4"``: 16 chips on 4
hosts) without the hardware; compiling a program for its devices runs the real TPU
compiler (Mosaic for Pallas kernels) on this host, with ``memory_analysis()`` and
``cost_analysis()``. All numbers are *per device* (the partitioned program).

- ``total`` bytes = arguments + outputs - donated aliases + temporaries; it fits when
  it is at most the device's usable HBM (what the TPU compiler reports as available).
  A program that does not fit often fails to compile ("Ran out of memory on HBM"): the
  required temporaries are then read from the compiler's message.
- ``roofline_step_s`` = max(executed FLOPs / peak bf16 FLOP/s, HBM traffic / HBM
  bandwidth): a lower bound on the step time. Executed FLOPs are counted from the model
  (XLA counts a loop body once; see below). HBM traffic is read from the optimized HLO
  (`hbm_traffic`: loops times their trips, VMEM staging and in-place updates counted as
  the HBM moves them); XLA's own "bytes accessed" is reported beside it (it counts a
  weight staged in VMEM two or three times). ``mfu_ceiling`` = model
  FLOPs (a standard transformer's forward + backward) / (roofline time * peak): the best
  MFU the step can reach.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, SingleDeviceSharding

from kvshare_jax import gpu_topology, hbm_traffic, sharding
from kvshare_jax.config import model_config_from
from kvshare_jax.flops import (  # noqa: F401 - CHIPS, Chip: part of this API
    CHIPS,
    GENERATIONS,
    GIB,
    Chip,
    chip_of,
    executed_generate_flops,
    executed_train_flops,
    loop_once_train_flops,
    model_train_flops,
)
from kvshare_jax.model import ModelConfig, init_params
from kvshare_jax.target import compile_only_libtpu, inference_compiler_options

_TOPOLOGY = re.compile(r"(v[0-9][a-z]?):([1-9][0-9]*(?:x[1-9][0-9]*){1,2})")
_HBM_OOM = (  # the TPU compiler's two wordings of "does not fit in HBM"
    re.compile(r"memory required for .+? \(([0-9.]+)([KMGT]?)\) exceeds available HBM"),
    re.compile(r"memory space hbm\. Used ([0-9.]+)([KMGT]?) of"),
)


@functools.lru_cache(maxsize=16)
def topology(name: str) -> tuple[Any, ...]:
    """The compile-only devices of a TPU slice such as ``"v5e:4x4"`` or ``"v4:2x2x1"``
    (generations v2, v3, v4, v5e, v5p, v6e; ``"v5e:1x1"`` is a single chip), or of one
    host of GPUs, ``"h100:N"`` / ``"h200:N"`` (:mod:`kvshare_jax.gpu_topology`)."""
    from jax.experimental import topologies

    if gpu_topology.is_gpu_topology(name):
        return gpu_topology.gpu_devices(name)
    m = _TOPOLOGY.fullmatch(name.strip())
    if m is None or m.group(1) not in GENERATIONS:
        raise ValueError(
            f"bad topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
            f"{', '.join(GENERATIONS)} (e.g. v5e:4x4, v4:2x2x1), or h100:N / h200:N"
        )
    dims = tuple(int(d) for d in m.group(2).split("x"))
    compile_only_libtpu()
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name.strip())
    except Exception as e:  # noqa: BLE001 - libtpu raises plain runtime errors
        if "chips_per_host_bounds" not in str(e):
            raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
        # smaller than one host's block of chips (e.g. v5e:1x1): one host holds them all
        bounds = (*dims, 1)[:3]
        try:
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=name.strip(), chips_per_host_bounds=bounds
            )
        except Exception as e2:  # noqa: BLE001
            raise ValueError(f"topology {name!r}: {str(e2).splitlines()[0]}") from None
    return tuple(desc.devices)


def num_hosts(devices: Any) -> int:
    return len({d.process_index for d in devices})


# ---------------------------------------------------------------- program reports
def oom_bytes(message: str) -> int | None:
    """Bytes the program needs, from the TPU compiler's HBM out-of-memory message."""
    for pattern in _HBM_OOM:
        m = pattern.search(message)
        if m:
            scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
            return int(float(m.group(1)) * scale)
    return None


def is_hbm_oom(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) and oom_bytes(str(error)) is not None


def memory_of(compiled: Any) -> dict[str, int]:
    """A compiled program's memory: arguments + outputs - donated aliases + temporaries."""
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def report(
    compiled: Any | None,
    chip: Chip,
    *,
    executed_flops: float = 0.0,
    model_flops: float | None = None,
    error: str = "",
) -> dict[str, Any]:
    """Per-device memory, cost and roofline of a compiled program (``compiled=None`` and
    ``error`` = the compiler's HBM out-of-memory message when it did not compile).
    ``executed_flops`` and ``model_flops`` are per device (see the FLOP counts below)."""
    out: dict[str, Any] = {"hbm_bytes_per_device": chip.hbm_bytes}
    if compiled is None:
        temps = oom_bytes(error)
        out |= {
            "fits": False,
            "bytes_per_device": {"arguments": None, "temporaries": temps, "total": temps},
            "flops_per_device": None,
            "bytes_accessed_per_device": None,
            "hbm_traffic_per_device": None,
            "roofline_step_s": None,
            "error": " ".join(error.split())[:300],
        }
        return out
    mem = memory_of(compiled)
    total = mem["total_bytes"]
    out |= {
        "fits": total <= chip.hbm_bytes,
        "bytes_per_device": {
            "arguments": mem["argument_bytes"],
            "outputs": mem["output_bytes"],
            "aliases": mem["alias_bytes"],
            "temporaries": mem["temp_bytes"],
            "total": total,
        },
        "executed_flops_per_device": executed_flops,
    }
    cost = _cost(compiled)
    if not cost:  # compile-only GPUs have no cost analysis: memory only
        out |= dict.fromkeys(
            ("flops_per_device", "bytes_accessed_per_device", "hbm_traffic_per_device")
        )
        out["roofline_step_s"] = executed_flops / chip.bf16_flops if executed_flops else None
        return out
    flops = float(cost.get("flops", 0.0))
    traffic = hbm_traffic.hbm_bytes(compiled.as_text())
    compute_s = max(flops, executed_flops) / chip.bf16_flops
    roofline = max(compute_s, traffic / chip.hbm_bandwidth)
    out |= {
        "flops_per_device": flops,
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "hbm_traffic_per_device": traffic,
        "roofline_step_s": roofline,
        "bound": "compute" if compute_s >= traffic / chip.hbm_bandwidth else "memory",
    }
    if model_flops is not None and roofline > 0:
        out["model_flops_per_device"] = model_flops
        out["mfu_ceiling"] = model_flops / (roofline * chip.bf16_flops)
    return out


def compile_or_report(
    lower: Any, chip: Chip, options: dict[str, str] | None = None, **flops: float
) -> tuple[Any | None, dict[str, Any]]:
    """Compiles ``lower()`` (a ``Lowered``, with compiler ``options``) and reports; an HBM
    out-of-memory compile error becomes a report with ``fits=False``; other compiler
    errors propagate."""
    try:
        compiled = lower().compile(options)
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError / JaxRuntimeError
        if not is_hbm_oom(e):
            raise
        return None, report(None, chip, error=str(e))
    return compiled, report(compiled, chip, **flops)


def train_program(config: ml_collections.ConfigDict, devices: Any) -> dict[str, Any]:
    """Compiles the sharded train step of ``config`` for ``devices``; the report adds
    the mesh and the micro-batch settings."""
    from kvshare_jax import train

    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    train.validate(config, mesh, rules)
    t = config.train
    cfg = model_config_from(config)
    tx = train.make_optimizer(t)
    abstract, shardings = train.state_shardings(cfg, tx, mesh, rules)
    sharding.check_shardable(abstract)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sharding)
    mask = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32, sharding=batch_sharding)
    batch = {"inputs": tokens, "targets": tokens, "loss_mask": mask}
    if config.data.get("packing", "concat") == "segments":  # the segment ids of packed rows
        batch["segment_ids"] = tokens
    step = train.jit_train_step(cfg, tx, int(t.grad_accum), mesh, rules, shardings)

    def lower():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return step.lower(abstract, batch)

    b, n = int(t.batch_size), len(devices)
    _, out = compile_or_report(
        lower,
        chip_of(devices[0]),
        executed_flops=executed_train_flops(cfg, b, int(t.seq_len)) / n,
        model_flops=model_train_flops(cfg, b, int(t.seq_len)) / n,
    )
    if out.get("flops_per_device"):
        once = loop_once_train_flops(cfg, b, int(t.seq_len), int(t.grad_accum)) / n
        out["loop_once_flops_per_device"] = once
        out["flops_ratio"] = out["flops_per_device"] / once
    out["mesh"] = dict(zip(sharding.MESH_AXES, mesh.devices.shape, strict=True))
    out["settings"] = {
        "batch_size": int(t.batch_size),
        "seq_len": int(t.seq_len),
        "grad_accum": int(t.grad_accum),
        "remat": bool(config.model.remat),
        "attention_impl": str(config.model.attention_impl),
        "packing": str(config.data.get("packing", "concat")),
    }
    return out


def _on(device: Any | None, tree: Any) -> Any:
    """Shapes of ``tree`` placed on ``device`` (unplaced when None)."""
    if device is None:
        return tree
    where = SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)


def _inference_shapes(cfg: ModelConfig, device: Any | None) -> Any:
    """Shapes of the params as the generation program takes them (matrices in the
    compute dtype: `decode.inference_params`)."""
    from kvshare_jax.decode import inference_params

    params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    return _on(device, jax.eval_shape(functools.partial(inference_params, cfg), params))


def _cache_shapes(cfg: ModelConfig, batch: int, length: int, device: Any | None) -> Any:
    from kvshare_jax.decode import init_cache

    platform = None if device is None else device.platform
    return _on(device, jax.eval_shape(lambda: init_cache(cfg, batch, length, platform)))


def _lower_on(device: Any | None, fn: Any, *args: Any) -> Any:
    """``fn.lower(*args)``, traced under a one-device mesh of ``device`` (so the kernels,
    the cache layout and ``attention_impl="auto"`` build for its platform)."""
    if device is None:
        return fn.lower(*args)
    with jax.set_mesh(Mesh([device], ("data",))):
        return fn.lower(*args)


def lower_generate(
    cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, device: Any | None = None
) -> Any:
    """Lowers the generation program (prefill + decode scan) from shapes alone; with a
    ``device``, for that device."""
    from kvshare_jax.decode import generate_fn

    args = (
        _inference_shapes(cfg, device),
        _cache_shapes(cfg, batch, prompt_len + gen_len - 1, device),
        *_on(
            device,
            (
                jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
                jax.eval_shape(lambda: jax.random.key(0)),
            ),
        ),
    )
    return _lower_on(device, generate_fn(cfg, max_new_tokens=gen_len), *args)


def generate_program(
    cfg: ModelConfig, device: Any, batch: int, prompt_len: int, gen_len: int
) -> dict[str, Any]:
    """Compiles the generation program for one device and reports (per device), with its
    cache-sized copies and its temporaries over the cache bytes."""
    executed = executed_generate_flops(cfg, batch, prompt_len, gen_len)
    compiled, out = compile_or_report(
        lambda: lower_generate(cfg, batch, prompt_len, gen_len, device),
        chip_of(device),
        inference_compiler_options(device.platform),
        executed_flops=executed,
    )
    out["settings"] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
    if compiled is not None:
        cache = _cache_shapes(cfg, batch, prompt_len + gen_len - 1, device)
        out |= _cache_account(compiled, cache)
    return out


# ---------------------------------------------------------------- the decode step
# A copy, a transpose, or a fusion XLA named after one: what relayouts a cache slot.
_COPY = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([0-9,]*)\]\S* (copy|transpose)\(")
_COPY_FUSION = re.compile(
    r"^\s*(?:ROOT )?%(?:copy|transpose)\S*fusion\S* = (\w+)\[([0-9,]*)\]\S* fusion\("
)
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def cache_copies(hlo_text: str, min_bytes: int, length: int) -> int:
    """Copies of cache data in an optimized HLO module: copy/transpose instructions (and
    copy or transpose fusions) whose output holds at least ``min_bytes`` and keeps the
    cache's time axis (a dimension of ``length``). Asynchronous copies between memory
    spaces (``copy-start``: prefetches into VMEM) are not relayouts and not counted; nor
    are one-time copies of weights or activations, which lack the time axis."""
    count = 0
    for line in hlo_text.splitlines():
        m = _COPY.match(line) or _COPY_FUSION.match(line)
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            nbytes = math.prod(dims) * _ITEMSIZE.get(m.group(1), 4)
            count += nbytes >= min_bytes and length in dims
    return count


_REMAT = re.compile(r"(?m)^\s*(?:ROOT )?%\S*\.remat\S* = ")


def rematerialized(hlo_text: str) -> int:
    """Instructions of an optimized HLO module that the compiler rematerialized
    (recomputed, ``*.remat*``) to fit its memory limit: each one reads its operands again,
    e.g. a whole cache slot for a decode attention score fusion."""
    return len(_REMAT.findall(hlo_text))


def _cache_account(compiled: Any, cache: Any) -> dict[str, Any]:
    """Cache bytes of a compiled program's cache argument (a quantized cache's scales
    included), its copies of a quarter of its smallest buffer (a slot, or a slot's
    scales) or more, the instructions the compiler rematerialized, and its temporaries
    over the cache bytes."""
    buffers = jax.tree.leaves(cache.buffers)
    smallest = min(x.size * x.dtype.itemsize for x in buffers)
    total = sum(x.size * x.dtype.itemsize for x in buffers)
    temps = int(compiled.memory_analysis().temp_size_in_bytes)
    text = compiled.as_text()
    return {
        "cache_bytes_per_device": total,
        "cache_layout": cache.layout,
        "cache_dtype": cache.k[0].dtype.name,
        "cache_copies": cache_copies(text, smallest // 4, cache.length),
        "rematerialized": rematerialized(text),
        "temporaries_over_cache": temps / total,
    }


def _cost(compiled: Any) -> dict[str, float] | None:
    """XLA's cost analysis of a compiled program (None where the device gives none)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def _bytes(compiled: Any) -> tuple[float, int]:
    """XLA's bytes accessed and the HBM traffic of a compiled program."""
    cost = float(_cost(compiled).get("bytes accessed", 0.0))
    return cost, hbm_traffic.hbm_bytes(compiled.as_text())


def _weights_pass(cfg: ModelConfig) -> Any:
    """The floor's weight part: every product of a decode step (embedding row, the
    projections of each layer, the LM head) at one token per sequence, no attention."""
    from kvshare_jax.model import BoundModel

    def program(params, tokens):
        run = BoundModel(cfg, params)
        x = run.embed(tokens[:, None])
        pos = jnp.zeros(x.shape[:2], jnp.int32)
        for i in range(cfg.num_layers):
            q, _ = run.qkv(i, x, pos)
            x = run.finish(i, x, q)  # the queries stand in for the attention output
        return run.logits(x)

    return jax.jit(program)


def _cache_pass(cfg: ModelConfig, layout: str) -> Any:
    """The floor's cache part: one token written in place into each KV layer's K and V
    (quantized with its scales for a quantized cache), then one attention read of its
    target's slot per layer (scores, softmax, values; scales applied), in layer order: as
    in a decode step, a layer's query depends on the layer below, so the reads of a shared
    slot cannot be merged into one."""
    from kvshare_jax.decode import write_kv

    kv = "BhS" if layout == "HS" else "BSh"

    def program(bufs, q, new, index):
        for slot in range(len(bufs[0])):
            bufs = write_kv(cfg, layout, bufs, slot, (new, new), index)
        k, v, k_scale, v_scale = bufs
        for slot in cfg.layout.slot_of_layer:  # each layer's query depends on the last
            ks, vs = k[slot].astype(q.dtype), v[slot].astype(q.dtype)  # (quantized slots)
            s = jnp.einsum(f"Bgh,{kv}->BgS", q, ks, preferred_element_type=jnp.float32)
            s = s * k_scale[slot][:, None] if k_scale else s
            p = jax.nn.softmax(s, axis=-1)
            p = (p * v_scale[slot][:, None] if v_scale else p).astype(q.dtype)
            out = jnp.einsum(f"BgS,{kv}->Bgh", p, vs, preferred_element_type=jnp.float32)
            q = (q + out).astype(q.dtype)  # (else XLA merges the reads of a shared slot)
        return q, bufs

    return jax.jit(program, donate_argnums=0)


def decode_floor_bytes(
    cfg: ModelConfig, device: Any, batch: int, cache_len: int
) -> tuple[float, int]:
    """Bytes accessed (XLA's cost analysis) and HBM traffic, per device, of the in-place
    floor of a decode step: :func:`_weights_pass` plus :func:`_cache_pass`, compiled for
    ``device`` with the cache of the generation program (the same for every attention
    implementation)."""
    return _floor_bytes(dataclasses.replace(cfg, attention_impl="xla"), device, batch, cache_len)


@functools.lru_cache(maxsize=64)
def _floor_bytes(cfg: ModelConfig, device: Any, batch: int, cache_len: int) -> tuple[float, int]:
    dtype = jnp.dtype(cfg.dtype)
    cache = _cache_shapes(cfg, batch, cache_len, device)
    g = cfg.num_heads // cfg.num_kv_heads
    rows = batch * cfg.num_kv_heads
    q, new = _on(
        device,
        (
            jax.ShapeDtypeStruct((rows, g, cfg.hd), dtype),
            jax.ShapeDtypeStruct((batch, 1, cfg.num_kv_heads, cfg.hd), dtype),
        ),
    )
    index, tokens = _on(
        device, (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    )
    weights = _lower_on(device, _weights_pass(cfg), _inference_shapes(cfg, device), tokens)
    kv = _lower_on(device, _cache_pass(cfg, cache.layout), cache.buffers, q, new, index)
    (w_cost, w_hbm), (kv_cost, kv_hbm) = _bytes(weights.compile()), _bytes(kv.compile())
    return w_cost + kv_cost, w_hbm + kv_hbm


def lower_decode_step(cfg: ModelConfig, batch: int, cache_len: int, device: Any) -> Any:
    """Lowers one decode step as the generation loop runs it: the params as that program
    takes them, the cache (donated) in the target's layout."""
    from kvshare_jax.decode import decode_step

    step = jax.jit(functools.partial(decode_step, cfg), donate_argnums=1)
    tokens = _on(device, jax.ShapeDtypeStruct((batch,), jnp.int32))
    cache = _cache_shapes(cfg, batch, cache_len, device)
    return _lower_on(device, step, _inference_shapes(cfg, device), cache, tokens)


def decode_step_program(
    cfg: ModelConfig, device: Any, batch: int, cache_len: int, floor: bool = True
) -> dict[str, Any]:
    """Compiles one decode step for ``device`` at ``batch`` and ``cache_len`` positions and
    reports, per device: memory, bytes accessed, its cache-sized copies, and (``floor``)
    the in-place floor (:func:`decode_floor_bytes`) with the ratio to it."""
    compiled, out = compile_or_report(
        lambda: lower_decode_step(cfg, batch, cache_len, device),
        chip_of(device),
        inference_compiler_options(device.platform),
    )
    out["settings"] = {"batch": batch, "cache_len": cache_len}
    if compiled is None:
        return out
    out |= _cache_account(compiled, _cache_shapes(cfg, batch, cache_len, device))
    keys = ("floor_bytes_per_device", "ratio_to_floor", "hbm_traffic_floor_per_device")
    if not floor or out["bytes_accessed_per_device"] is None:  # (no cost analysis: GPU)
        return out | dict.fromkeys((*keys, "hbm_traffic_ratio_to_floor"))
    cost, traffic = decode_floor_bytes(cfg, device, batch, cache_len)
    return out | {
        "floor_bytes_per_device": cost,
        "ratio_to_floor": out["bytes_accessed_per_device"] / cost,
        "hbm_traffic_floor_per_device": traffic,
        "hbm_traffic_ratio_to_floor": out["hbm_traffic_per_device"] / traffic,
    }


# ---------------------------------------------------------------- fitting
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fit_candidates(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Overrides to try, cheapest first: more gradient accumulation, then remat, then
    parameters sharded over every device (fsdp = -1, data = 1) with accumulation."""
    t, m = config.train, config.model
    accums = [a for a in _divisors(int(t.batch_size)) if a > int(t.grad_accum)]
    out = [{"train.grad_accum": a} for a in accums]
    if not m.remat:
        out += [{"model.remat": True, "train.grad_accum": a} for a in [int(t.grad_accum), *accums]]
    if int(config.mesh.fsdp) != -1:
        out += [
            {"mesh.data": 1, "mesh.fsdp": -1, "model.remat": True, "train.grad_accum": a}
            for a in [int(t.grad_accum), *accums]
        ]
    return out


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> Any:
    """A copy of ``config`` with ``{"section.field": value}`` applied."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def find_fit(
    config: ml_collections.ConfigDict, devices: Any, progress: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first of :func:`fit_candidates` whose train step compiles and fits, and its
    report; ``(None, None)`` when none does. Candidates that are not valid for the mesh
    (micro-batch not divisible by the data-parallel size) are skipped."""
    from tqdm import tqdm

    for overrides in tqdm(fit_candidates(config), desc="fit search", disable=not progress):
        try:
            out = train_program(with_overrides(config, overrides), devices)
        except ValueError:
            continue
        if out["fits"]:
            return overrides, out
    return None, None


def overrides_text(overrides: dict[str, Any]) -> str:
    """``--config.train.grad_accum=4 --config.model.remat=true``."""

    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"--config.{k}={value(v)}" for k, v in overrides.items())


# ---------------------------------------------------------------- the plan
PROGRAMS = ("train_step", "generate", "decode_step")


def generate_lengths(config: Any, prompt_len: int | None, gen_len: int | None) -> tuple[int, int]:
    """The generate program's lengths: the flags, else the study's, else 512 prompt tokens
    (a quarter of the context when shorter) and the rest of the context."""
    max_len = int(config.model.max_len)
    study = config.get("study")
    if prompt_len is None:
        prompt_len = study.prompt_len if study else min(512, max_len // 4)
    prompt = int(prompt_len)
    gen = int(gen_len if gen_len is not None else (study.gen_len if study else max_len - prompt))
    if prompt < 1 or gen < 1 or prompt + gen > max_len:
        raise ValueError(
            f"prompt {prompt} + generated {gen} tokens must be >= 1 each and fit the "
            f"context of {max_len}"
        )
    return prompt, gen


def compile_config(
    config: Any,
    slice_name: str,
    programs: tuple[str, ...] = PROGRAMS,
    *,
    gen_batch: int = 1,
    prompt_len: int | None = None,
    gen_len: int | None = None,
    search: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """What ``kvshare compile`` reports: the train step (with a fit search when it does
    not fit and ``search``) and the generation program, compiled for the TPU slice
    ``slice_name`` (e.g. ``"v5e:4x4"``); JSON-ready."""
    devices = topology(slice_name)
    out: dict[str, Any] = {
        "topology": slice_name,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_hosts": num_hosts(devices),
        "chip": vars(chip_of(devices[0])),
        "programs": {},
    }
    if {"generate", "decode_step"} & set(programs):  # check flags before the train compile
        if gen_batch < 1:
            raise ValueError(f"--gen-batch must be >= 1, got {gen_batch}")
        lengths = generate_lengths(config, prompt_len, gen_len)
    if "train_step" in programs:
        train = train_program(config, devices)
        out["programs"]["train_step"] = train
        if not train["fits"] and search:
            overrides, fit = find_fit(config, devices, progress=progress)
            out["suggestion"] = (
                {"overrides": overrides_text(overrides), "train_step": fit}
                if overrides
                else {"overrides": None, "note": "no grad_accum/remat/fsdp setting fits"}
            )
    cfg = model_config_from(config)
    if "generate" in programs:
        out["programs"]["generate"] = generate_program(cfg, devices[0], gen_batch, *lengths)
    if "decode_step" in programs:
        cache_len = lengths[0] + lengths[1] - 1
        out["programs"]["decode_step"] = decode_step_program(cfg, devices[0], gen_batch, cache_len)
    return out
