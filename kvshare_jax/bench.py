"""Generation benchmark: decode throughput, prefill latency and memory per layout.

Every program is compiled and run once (warm-up) before it is timed; each timed call
ends in ``jax.block_until_ready`` and gets a fresh cache (allocated outside the timer,
since the program donates it); the best of ``repeats`` calls is reported. Prompts are
random tokens of one length; decoding is greedy with no stop token, so every sequence
runs all ``gen_len`` steps (the decoder has no early exit anyway).

- ``e2e tok/s`` = ``batch * gen_len / t(generate)`` (prefill included, as in HF
  ``generate``); ``decode tok/s`` = ``batch * (gen_len - 1) / t(decode)``, the
  ``gen_len - 1`` greedy decode steps alone, timed from a prefilled cache.
- Memory is the compiled program's own account (``memory_analysis``): arguments +
  outputs - donated aliases + temporaries, i.e. params + cache + work space.
- The max batch under a budget is found by compiling (never running) candidates.
- Roofline of a decode step = (params read + each cache slot read once) / measured
  streaming read bandwidth (:func:`probes.read_bandwidth`: the best of an XLA sum, an
  XLA matrix-vector product and the CPU matvec kernel over 1 GiB).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kvshare_jax import aot
from kvshare_jax.decode import (
    cache_bytes,
    decode_step,
    generate_fn,
    inference_params,
    init_cache,
    prefill,
    slot_dtype,
)
from kvshare_jax.model import ModelConfig, Params, count_params, init_params
from kvshare_jax.prefill import DEFAULT as DEFAULT_PREFILL
from kvshare_jax.prefill import Prefill
from kvshare_jax.probes import best_time, device_info, read_bandwidth
from kvshare_jax.sampling import greedy_argmax
from kvshare_jax.target import inference_compiler_options, target_platform

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MiB"``, ``"1.5GB"`` or ``"1000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {text!r} (e.g. 2GiB, 512MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_lengths(platform: str | None = None) -> tuple[int, int]:
    """(prompt, generated) tokens: 16 + 128 on CPU, 512 + 1024 on accelerators (the
    target ``platform``, default: see :mod:`kvshare_jax.target`)."""
    return (16, 128) if target_platform(platform) == "cpu" else (512, 1024)


def decode_step_bytes(cfg: ModelConfig, params: Params, batch: int, cache_len: int) -> int:
    """Bytes a decode step must read at least: every parameter except the embedding
    table (one row per token; it is read in full when tied to the LM head) plus every
    cache slot once."""

    def nbytes(x: Any) -> int:  # arrays and ShapeDtypeStructs alike
        return x.size * x.dtype.itemsize

    total = sum(nbytes(x) for x in jax.tree_util.tree_leaves(params))
    if not cfg.tie_embeddings:
        total -= nbytes(params["params"]["embed"]["embedding"])
    return total + cache_bytes(cfg, batch, cache_len)


# ---------------------------------------------------------------- programs
def _inputs(cfg: ModelConfig, batch: int, prompt_len: int, seed: int = 0):
    prompts = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, cfg.vocab_size)
    return prompts.astype(jnp.int32), jnp.full((batch,), prompt_len, jnp.int32)


@functools.lru_cache(maxsize=16)
def compile_generate(
    cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, device: Any = None
) -> Any:
    """The generation program compiled ahead of time for these shapes (not run), for
    ``device`` (e.g. a TPU of a compile-only topology) or the default device.

    Compiled from shapes alone (params included), so it is memoised: the max-batch
    search and the timed runs share compilations.
    """
    options = inference_compiler_options(None if device is None else device.platform)
    return aot.lower_generate(cfg, batch, prompt_len, gen_len, device).compile(options)


def program_memory(
    cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, device: Any = None
) -> dict[str, int] | None:
    """Memory of the compiled generation program at ``batch`` (compiled, not run); None
    when the compiler refuses it for lack of device memory."""
    return _memory_and_need(cfg, batch, prompt_len, gen_len, device)[0]


def max_batch(
    cfg: ModelConfig,
    budget: int,
    prompt_len: int,
    gen_len: int,
    limit: int = 1 << 16,
    device: Any = None,
    hint: int | None = None,
) -> tuple[int, dict[str, int] | None]:
    """Largest batch whose compiled program fits ``budget`` bytes, and its memory.

    Memory is about affine in the batch, so two compilations give a first guess (or
    ``hint``, e.g. the answer for a layout with the same cache: each compile of a large
    batch takes minutes on a small host); steps of doubling size away from it bracket the
    answer and a bisection makes it exact (where memory grows with the batch, as it does
    past the smallest batches).
    """
    known: dict[int, dict[str, int] | None] = {}
    need: dict[int, int | None] = {}  # total bytes, also of a program refused for memory

    def fits(b: int) -> bool:
        if b not in known:
            known[b], need[b] = _memory_and_need(cfg, b, prompt_len, gen_len, device)
        return known[b] is not None and known[b]["total_bytes"] <= budget

    if hint is not None and 1 <= hint <= limit:
        return _bracket(fits, known, int(hint), limit)
    if not fits(1):
        return 0, None
    # the slope from batch 1: the compiler's choices at tiny batches can make 2 cost
    # less than 1 (seen on TPU), so probe further out until the slope is positive
    per_seq = 0
    for probe in (2, 16):
        if not fits(probe):
            break
        per_seq = (known[probe]["total_bytes"] - known[1]["total_bytes"]) // (probe - 1)
        if per_seq > 0:
            break
    per_seq = per_seq if per_seq > 0 else max(known[1]["total_bytes"], 1)
    guess = int(min(limit, max(1, 1 + (budget - known[1]["total_bytes"]) // per_seq)))
    # secant steps through the guesses (at most three): the smallest batches skew the
    # slope (prefill groups fill up, an extra cache copy at batch 1 on CPU); past them it
    # is steady, so a step or two land next to the answer. A program the compiler refuses
    # for memory still tells the bytes it needed.
    ref = max(known)
    for _ in range(3):
        fits(guess)
        if guess == ref or need.get(guess) is None or need.get(ref) is None:
            break
        slope = (need[guess] - need[ref]) / (guess - ref)
        if slope <= 0:
            break
        ref, guess = guess, int(min(limit, max(1, guess + (budget - need[guess]) // slope)))
    return _bracket(fits, known, guess, limit)


def _memory_and_need(
    cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, device: Any
) -> tuple[dict[str, int] | None, int | None]:
    """`program_memory`, and the program's total bytes even when the compiler refused it
    for lack of device memory (read from its message; None if it names none)."""
    try:
        mem = aot.memory_of(compile_generate(cfg, batch, prompt_len, gen_len, device))
    except Exception as e:  # noqa: BLE001 - the TPU compiler's RESOURCE_EXHAUSTED
        if aot.is_hbm_oom(e):
            return None, aot.oom_bytes(str(e))
        raise
    return mem, mem["total_bytes"]


def _bracket(fits: Callable[[int], bool], known: dict, guess: int, limit: int):
    """Exact largest fitting batch from a first ``guess``: doubling steps away from it,
    then a bisection. The batches compiled before (``known``) bound the search: it starts
    between the largest one known to fit and the next one known not to, and never steps
    past either (memory grows with the batch), so no compile repeats what is known."""
    ok = {b: fits(b) for b in list(known)}  # compiled already: nothing is compiled here
    floor = max((b for b, f in ok.items() if f), default=1)
    ceiling = min((b for b, f in ok.items() if not f and b > floor), default=limit + 1)
    guess = min(max(guess, floor), ceiling - 1)
    lo, hi, step = 1, limit + 1, 1  # invariant: fits(lo), not fits(hi)
    if fits(guess):
        lo = guess
        while lo + step < ceiling and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(lo + step, ceiling)
    else:
        hi = guess
        while hi - step > floor and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, floor)
        if lo == 1 and not fits(1):
            return 0, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, known[lo]


def _decode_scan(cfg: ModelConfig, steps: int) -> Callable:
    """``steps`` greedy decode steps after a prefill: the scan of the generation program
    on its own (cache donated), to time decoding without the prefill."""

    def program(params, cache, tokens):
        def body(carry, _):
            cache, tokens = carry
            logits, cache = decode_step(cfg, params, cache, tokens)
            tokens = greedy_argmax(logits)
            return (cache, tokens), tokens

        (cache, _), out = jax.lax.scan(body, (cache, tokens), None, length=steps)
        return out, cache

    return jax.jit(program, donate_argnums=1, compiler_options=inference_compiler_options())


def bench_generate(
    cfg: ModelConfig,
    params: Params,
    *,
    batch: int,
    prompt_len: int,
    gen_len: int,
    warmup: int = 1,
    repeats: int = 3,
    prefill_settings: Prefill = DEFAULT_PREFILL,
) -> dict[str, Any]:
    """Times the generation program, prefill alone and the decode scan alone at ``batch``.

    All three are compiled ahead of time, so no timing includes compilation.
    ``prefill_settings``: the prefill iteration (default: the decoder's);
    ``prefill_passes_run`` reports the passes it ran on the benchmark's prompts.
    """
    params = inference_params(cfg, params)  # what compile_generate's program takes
    prompts, lengths = _inputs(cfg, batch, prompt_len)
    cache_len = prompt_len + gen_len - 1
    cache_shape = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    rng = jax.random.key(0)
    if prefill_settings == DEFAULT_PREFILL:  # the program the max-batch search compiled
        gen = compile_generate(cfg, batch, prompt_len, gen_len)
    else:
        program = generate_fn(cfg, max_new_tokens=gen_len, prefill_settings=prefill_settings)
        gen = program.lower(params, cache_shape, prompts, lengths, rng).compile()
    options = dict(**prefill_settings.iteration(), return_passes=True)
    run_prefill = jax.jit(
        lambda p, c, x, n: prefill(cfg, p, c, x, n, **options),
        donate_argnums=1,
        compiler_options=inference_compiler_options(),
    )
    run_prefill = run_prefill.lower(params, cache_shape, prompts, lengths).compile()
    run_decode = _decode_scan(cfg, gen_len - 1).lower(params, cache_shape, tokens).compile()

    def fresh_cache() -> Any:  # each timed call gets one: the programs donate it
        return init_cache(cfg, batch, cache_len)

    def prefilled() -> tuple[Any, jax.Array]:
        logits, cache, _ = run_prefill(params, fresh_cache(), prompts, lengths)
        return cache, greedy_argmax(logits)

    def timed(program: Callable, setup: Callable = fresh_cache) -> float:
        return best_time(program, warmup=warmup, repeats=repeats, setup=setup)

    t_gen = timed(lambda c: gen(params, c, prompts, lengths, rng))
    t_prefill = timed(lambda c: run_prefill(params, c, prompts, lengths))
    t_decode = timed(lambda c: run_decode(params, *c), prefilled)
    ran = run_prefill(params, init_cache(cfg, batch, cache_len), prompts, lengths)[2]
    steps = max(gen_len - 1, 1)
    return {
        "batch": batch,
        "generate_s": t_gen,
        "prefill_s": t_prefill,
        "prefill_passes_run": int(ran),
        "decode_s": t_decode,
        "e2e_tok_s": batch * gen_len / t_gen,
        "decode_tok_s": batch * steps / t_decode,
        "decode_step_s": t_decode / steps,
        "memory": aot.memory_of(gen),
    }


# ---------------------------------------------------------------- the suite
@dataclasses.dataclass
class BenchSpec:
    """What to benchmark (one model shape, several layouts)."""

    base: ModelConfig  # model shape; its layout is replaced by each entry of `layouts`
    layouts: Sequence[str]  # layout specs ('standard', 'pizza-bottom:4', '0_1_1_3'...)
    batch_sizes: Sequence[int] = (1, 32)
    prompt_len: int = 16
    gen_len: int = 128
    memory_budget: int | None = None  # bytes; None = no max-batch search
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    prefill_settings: Prefill = DEFAULT_PREFILL  # the prompt's iteration (kvshare_jax/prefill.py)


def _check_spec(spec: BenchSpec) -> dict[str, Any]:
    """Validates the spec; returns its layouts by name."""
    from kvshare_jax.layout import from_spec

    base = spec.base
    if min(spec.batch_sizes, default=1) < 1 or spec.prompt_len < 1 or spec.gen_len < 1:
        raise ValueError("batch sizes, prompt length and generated length must be >= 1")
    if spec.prompt_len + spec.gen_len > base.max_len:
        raise ValueError(
            f"prompt {spec.prompt_len} + generated {spec.gen_len} tokens exceed the model "
            f"context of {base.max_len}"
        )
    return {name: from_spec(name, base.num_layers) for name in spec.layouts}


def _row(name: str, cfg: ModelConfig, params: Any, cache_len: int) -> dict[str, Any]:
    """The columns of a layout that need no measurement."""
    return {
        "layout": name,
        "mapping": str(cfg.layout),
        "kv_layers": cfg.layout.num_kv_layers,
        "kv_cache_dtype": slot_dtype(cfg).name,  # of the slots: int8, float8_e4m3fn, ...
        "params": count_params(params),
        "cache_bytes_per_seq": cache_bytes(cfg, 1, cache_len),
        "runs": [],
    }


def _meta(spec: BenchSpec, **extra: Any) -> dict[str, Any]:
    base = spec.base
    return {
        "dtype": base.dtype,
        "param_dtype": base.param_dtype,
        "model": {  # every model field but the layout (each row has its own)
            "num_layers": base.num_layers,
            **{
                f.name: getattr(base, f.name)
                for f in dataclasses.fields(base)
                if f.name != "layout"
            },
        },
        "prompt_len": spec.prompt_len,
        "gen_len": spec.gen_len,
        "batch_sizes": list(spec.batch_sizes),
        "memory_budget": spec.memory_budget,
        "warmup": spec.warmup,
        "repeats": spec.repeats,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **extra,
    }


def measure_layout(
    name: str,
    cfg: ModelConfig,
    params: Params,
    spec: BenchSpec,
    bandwidth: float | None = None,
    known_max_batch: tuple[int, dict[str, int] | None] | None = None,
) -> dict[str, Any]:
    """Everything measured for one layout: timed runs at ``spec.batch_sizes`` (with the
    decode roofline when ``bandwidth`` is given), and the max batch under
    ``spec.memory_budget`` with its timed run. ``known_max_batch`` (batch, memory) skips
    the search, e.g. for another seed of a layout: the fit depends on shapes only.
    ``kvshare bench`` and the study both use it; a new column is added here (and
    rendered in ``bench_report.py``)."""
    cache_len = spec.prompt_len + spec.gen_len - 1
    row = _row(name, cfg, params, cache_len)
    timed = functools.partial(
        bench_generate,
        cfg,
        params,
        prompt_len=spec.prompt_len,
        gen_len=spec.gen_len,
        warmup=spec.warmup,
        repeats=spec.repeats,
        prefill_settings=spec.prefill_settings,
    )
    for b in spec.batch_sizes:
        result = timed(batch=b)
        if bandwidth:
            roofline_s = decode_step_bytes(cfg, params, b, cache_len) / bandwidth
            result["roofline_step_s"] = roofline_s
            result["roofline_fraction"] = roofline_s / result["decode_step_s"]
        row["runs"].append(result)
    if spec.memory_budget is not None:
        b, mem = known_max_batch or max_batch(
            cfg, spec.memory_budget, spec.prompt_len, spec.gen_len
        )
        row["memory_budget"] = spec.memory_budget
        row["max_batch"], row["max_batch_memory"] = b, mem
        row["max_batch_run"] = timed(batch=b) if b > 0 else None
    return row


def run_suite(spec: BenchSpec, progress: bool = True) -> dict[str, Any]:
    """Benchmarks every layout; returns the JSON-ready results."""
    from tqdm import tqdm

    layouts = _check_spec(spec)
    bandwidth = read_bandwidth()["best"]
    rows = []
    for name, layout in tqdm(layouts.items(), desc="layouts", disable=not progress):
        cfg = dataclasses.replace(spec.base, layout=layout)
        params = init_params(cfg, jax.random.key(spec.seed))
        rows.append(measure_layout(name, cfg, params, spec, bandwidth))
        compile_generate.cache_clear()
        jax.clear_caches()
    meta = _meta(spec, **device_info(), read_bandwidth_bytes_s=bandwidth)
    return {"meta": meta, "rows": rows}


def compile_suite(
    spec: BenchSpec,
    topology: str,
    progress: bool = True,
    done: Sequence[dict[str, Any]] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The max-batch column for one device of a TPU ``topology``, from the TPU compiler's
    memory account alone (nothing runs: throughput is "not measured"). Beside it, the
    decode roofline on that chip: the HBM traffic of the compiled decode step at that
    batch (`aot.decode_step_program`) / HBM bandwidth.

    ``done``: rows of an earlier run of the same spec (kept, not recompiled; their max
    batches seed the search). ``on_row``: called with the results so far after each
    layout, so an interrupted search keeps what it found.
    """
    from tqdm import tqdm

    layouts = _check_spec(spec)
    device = aot.topology(topology)[0]
    meta = compile_meta(spec, topology)
    budget = meta["memory_budget"]
    kept = {row["layout"]: row for row in done if row["layout"] in layouts}
    rows = []
    for name, layout in tqdm(layouts.items(), desc="layouts", disable=not progress):
        row = kept.get(name) or _max_batch_row(name, spec, layout, device, budget, rows)
        if progress:
            tqdm.write(f"{name}: max batch {row['max_batch']}", file=sys.stderr)
        rows.append(row)
        if on_row is not None:
            on_row({"meta": meta, "rows": [*rows]})
    return {"meta": meta, "rows": rows}


def compile_meta(spec: BenchSpec, topology: str) -> dict[str, Any]:
    """The ``meta`` of `compile_suite`'s results (``memory_budget``: the one searched)."""
    device = aot.topology(topology)[0]
    chip = aot.chip_of(device)
    return _meta(
        spec,
        platform="tpu",
        device_kind=device.device_kind,
        topology=topology,
        chip=vars(chip),
        memory_budget=spec.memory_budget or chip.hbm_bytes,
        measured=False,
        jax_version=jax.__version__,
    )


def _max_batch_row(name, spec, layout, device, budget, rows) -> dict[str, Any]:
    """One layout's row of `compile_suite`; ``rows``: those found before, for a guess."""
    cfg = dataclasses.replace(spec.base, layout=layout)
    params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    cache_len = spec.prompt_len + spec.gen_len - 1
    row = _row(name, cfg, params, cache_len)
    b, mem = max_batch(cfg, budget, spec.prompt_len, spec.gen_len, device=device,
                       hint=_batch_guess(row, rows, budget))  # fmt: skip
    row["max_batch"], row["max_batch_memory"] = b, mem
    step = aot.decode_step_program(cfg, device, b, cache_len, floor=False) if b > 0 else {}
    if step.get("hbm_traffic_per_device"):  # the decode step's roofline (none on GPUs)
        chip = aot.chip_of(device)
        step_s = step["hbm_traffic_per_device"] / chip.hbm_bandwidth
        row["max_batch_roofline"] = {
            "decode_step_s": step_s,
            "decode_tok_s": b / step_s,
            "step_bytes": step["hbm_traffic_per_device"],
            "bytes_accessed": step["bytes_accessed_per_device"],
            "cache_copies": step["cache_copies"],
        }
    compile_generate.cache_clear()  # TPU executables of every probed batch: GiBs
    jax.clear_caches()
    gc.collect()
    return row


def _batch_guess(row: dict[str, Any], rows: Sequence[dict[str, Any]], budget: int) -> int | None:
    """A first guess of ``row``'s max batch from the layouts found before: the answer of
    one with as many KV layers, else one's memory with its per-sequence bytes scaled by
    the cache (weights fixed). None when none fitted."""
    found = [r for r in rows if r["max_batch"] > 0]
    same = [r["max_batch"] for r in found if r["kv_layers"] == row["kv_layers"]]
    if same or not found:
        return same[-1] if same else None
    ref = found[-1]
    fixed = (
        ref["max_batch_memory"].get("argument_bytes", 0)
        - ref["max_batch"] * ref["cache_bytes_per_seq"]
    )
    fixed = max(0, min(fixed, ref["max_batch_memory"]["total_bytes"]))
    per_seq = (ref["max_batch_memory"]["total_bytes"] - fixed) / ref["max_batch"]
    per_seq *= row["cache_bytes_per_seq"] / ref["cache_bytes_per_seq"]
    return max(1, int((budget - fixed) // per_seq)) if per_seq > 0 else None
