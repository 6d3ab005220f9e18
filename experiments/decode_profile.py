"""Where a CPU decode step's time goes: per-op profile of the generation program.

    JAX_PLATFORMS=cpu python experiments/decode_profile.py [--batches 8,32] [--isa avx2]

Runs ``decode.generate_fn`` on a random model of the llama_tiny shape (the one
``experiments/peer_throughput.py`` races against CTranslate2: L=8, d=512, 8/8 heads,
d_ff 1376, vocab 32000, fp32; 16-token prompts, ``--gen-len`` greedy tokens) under
``jax.profiler.trace`` after a warm-up, and reads the XLA:CPU thunk events of the trace:
each op's time (summed over the steps, then per decode step), its share, and for the
weight products (ops whose fused computation holds a ``dot`` with a weight operand) the
GFLOP/s against ``--peak-gflops`` (default: 2 FMA units x 8 fp32 lanes x 2 per cycle x the
clock of ``/proc/cpuinfo`` x the cores, an AVX2 machine's peak). Ops are grouped as
*weight products*, *attention* (dots over the cache), *sampling/head* (the LM head's
arg-max and friends) and *other* (norms, RoPE, residual adds, cache writes, copies).

It also records what CTranslate2 picks on this machine (``CT2_VERBOSE=1``: its ISA and
GEMM backend) when ``ctranslate2`` is installed (the ``[peer]`` extra). Writes
``experiments/results/<name>.{json,md}`` (default ``decode_profile_cpu``). ``--isa avx2``
caps XLA and the kernel at AVX2 on an AVX-512 host (as ``peer_throughput.py --isa``).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from peer_throughput import AVX2_ENV, LLAMA_TINY, build_hf, convert_ct2  # noqa: E402

_INS = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*)$")
_SHAPE = re.compile(r"(\w+)\[([0-9,]*)\]")
KINDS = ("weight products", "attention", "other")


def _dims(text: str) -> list[int]:
    m = _SHAPE.search(text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _dot(shape: str, rest: str, shapes: dict[str, str]) -> tuple[float, str]:
    """FLOPs of one ``dot`` instruction and its kind: "attention" when it has batch
    dimensions (per-head products over the cache), else "weight products"."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    lhs = _dims(shapes.get(operands[0], "")) if operands else []
    contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i) if contract else 1
    kind = "attention" if "lhs_batch_dims" in rest else "weight products"
    return 2.0 * math.prod(_dims(shape)) * k, kind


def _kernel_product(shape: str, rest: str, shapes: dict[str, str]) -> tuple[float, str]:
    """FLOPs of a call of the CPU matvec kernel (``x [M, K] @ w [K, N]``), else none."""
    if 'custom_call_target="kvshare_matvec"' not in rest:
        return 0.0, "other"
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    k = _dims(shapes.get(operands[0], ""))[-1:] if operands else []
    return 2.0 * math.prod(_dims(shape)) * (k[0] if k else 0), "weight products"


def hlo_ops(text: str) -> dict[str, tuple[float, str]]:
    """Instruction name -> (dot FLOPs, kind) for an optimized CPU HLO module; a fusion
    (or call) counts the dots of the computation it calls."""
    comps: dict[str, list[tuple[str, ...]]] = {}
    current = ""
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{\s*$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif (m := _INS.match(line)) and current:
            comps[current].append(m.groups())
    shapes = {ins[0]: ins[1] for ops in comps.values() for ins in ops}

    def of(ins: tuple[str, ...]) -> tuple[float, str]:
        name, shape, opcode, rest = ins
        if opcode == "dot":
            return _dot(shape, rest, shapes)
        if opcode == "custom-call":
            return _kernel_product(shape, rest, shapes)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        parts = [of(i) for i in comps.get(called.group(1), [])] if called else []
        flops = sum(f for f, _ in parts)
        kinds = [k for f, k in parts if f]
        return flops, (kinds[0] if kinds else "other")

    return {ins[0]: of(ins) for ops in comps.values() for ins in ops}


def thunk_events(trace_dir: str) -> dict[str, list[float]]:
    """Op name -> durations (s) of the XLA:CPU thunk events in a ``jax.profiler`` trace."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    out: dict[str, list[float]] = defaultdict(list)
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                if not e.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ")):
                    out[e.name].append(e.duration_ns * 1e-9)
    return out


def fma_peak_gflops() -> float:
    """2 FMA units x 8 fp32 lanes (AVX2) x 2 FLOPs x the clock x the logical CPUs."""
    mhz = [float(x) for x in re.findall(r"cpu MHz\s*:\s*([\d.]+)", open("/proc/cpuinfo").read())]
    return 32 * (max(mhz) if mhz else 2000.0) * 1e-3 * (os.cpu_count() or 1)


def profile(batch: int, gen_len: int, prompt_len: int = 16) -> dict:
    """The per-op profile of one generation of ``batch`` sequences."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvshare_jax import decode
    from kvshare_jax.model import ModelConfig, init_params

    shape = dict(num_layers=8, d_model=512, num_heads=8, d_ff=1376, vocab_size=32000)
    cfg = ModelConfig.create("standard", max_len=prompt_len + gen_len, **shape)
    params = decode.inference_params(cfg, init_params(cfg, jax.random.key(0)))
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 32000, (batch, prompt_len)))
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    fn = decode.generate_fn(cfg, max_new_tokens=gen_len)

    def run():
        cache = decode.init_cache(cfg, batch, prompt_len + gen_len - 1)
        return jax.block_until_ready(fn(params, cache, prompts.astype(jnp.int32), lengths,
                                        jax.random.key(0))[0].tokens)  # fmt: skip

    cache = decode.init_cache(cfg, batch, prompt_len + gen_len - 1)
    compiled = fn.lower(params, cache, prompts.astype(jnp.int32), lengths, jax.random.key(0))
    ops = hlo_ops(compiled.compile().as_text())
    run()
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    trace = tempfile.mkdtemp(prefix="decode_profile_")
    with jax.profiler.trace(trace):
        start = time.perf_counter()
        run()
        traced = time.perf_counter() - start
    steps = gen_len - 1  # decode steps after the prefill
    rows = []
    for name, durations in thunk_events(trace).items():
        flops, kind = ops.get(name, (0.0, "other"))
        per_call = float(np.median(durations))
        rate = flops / per_call / 1e9 if flops and per_call else None
        rows.append({"op": name, "kind": kind, "calls": len(durations),
                     "total_s": float(sum(durations)), "median_us": per_call * 1e6,
                     "gflop_s": rate})  # fmt: skip
    rows.sort(key=lambda r: -r["total_s"])
    busy = sum(r["total_s"] for r in rows)
    by_kind = {k: sum(r["total_s"] for r in rows if r["kind"] == k) for k in KINDS}
    return {
        "batch": batch, "gen_len": gen_len, "prompt_len": prompt_len,
        "wall_s": min(walls), "traced_wall_s": traced, "thunk_s": busy,
        "tok_s": batch * gen_len / min(walls),
        "step_ms": {k: v / steps * 1e3 for k, v in by_kind.items()},
        "share": {k: v / busy for k, v in by_kind.items()},
        "ops": rows,
    }  # fmt: skip


def ct2_choice(gen_len: int) -> list[str]:
    """The lines CTranslate2 logs about its ISA and GEMM backend (``CT2_VERBOSE=1``)."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return ["ctranslate2 not installed (the [peer] extra)"]
    cache = os.path.join(tempfile.gettempdir(), "peer_throughput")
    tag = "_".join(f"{k}{v}" for k, v in LLAMA_TINY.items())
    hf_dir = build_hf(os.path.join(cache, f"hf_{tag}"), **LLAMA_TINY)
    ct2_dir = convert_ct2(hf_dir, os.path.join(cache, f"ct2_{tag}"))
    code = (f"import ctranslate2; g = ctranslate2.Generator({ct2_dir!r}, device='cpu'); "
            "g.generate_batch([[5, 6, 7]], max_length=2)")  # fmt: skip
    env = dict(os.environ, CT2_VERBOSE="1")
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return [ln.split("] ", 1)[-1] for ln in err.stderr.splitlines() if "CPU" in ln or "ISA" in ln]


def markdown(res: dict) -> str:
    from kvshare_jax.tables import markdown_table

    lines = [
        "# Where the CPU decode step's time goes (llama_tiny shape, fp32)",
        "",
        f"Command: `{res['command']}`  ",
        f"{res['cpu']}, {res['isa']}; JAX {res['jax']}; load average at start "
        f"{res['load_start']}, at end {res['load_end']}; FMA peak assumed "
        f"{res['peak_gflops']:.0f} GFLOP/s.",
        "",
        "CTranslate2 on this machine: " + "; ".join(res["ct2"]),
        "",
    ]
    for p in res["profiles"]:
        lines += [
            f"## Batch {p['batch']}: {p['tok_s']:.0f} tok/s ({p['gen_len']} tokens, wall "
            f"{p['wall_s']:.3f} s; the thunks were busy {p['thunk_s']:.3f} s of a traced "
            f"{p['traced_wall_s']:.3f} s)",
            "",
        ]
        lines += markdown_table(
            ("group", "ms per decode step", "share"),
            [(k, f"{p['step_ms'][k]:.3f}", f"{p['share'][k]:.0%}") for k in KINDS],
        )
        lines += [""]
        rows = [(r["op"][:48], r["kind"], str(r["calls"]), f"{r['total_s'] * 1e3:.1f}",
                 f"{r['median_us']:.1f}",
                 "-" if r["gflop_s"] is None else f"{r['gflop_s']:.1f}",
                 "-" if r["gflop_s"] is None else f"{r['gflop_s'] / res['peak_gflops']:.0%}")
                for r in p["ops"][:15]]  # fmt: skip
        lines += markdown_table(
            ("op", "group", "calls", "total ms", "median us", "GFLOP/s", "of peak"), rows
        )
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--peak-gflops", type=float, default=0.0, help="0: from /proc/cpuinfo")
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "experiments", "results"))
    p.add_argument("--name", default="decode_profile_cpu")
    args = p.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("KVSHARE_CPU_ISA") != "avx2":
        env = dict(os.environ)
        for key, value in AVX2_ENV.items():
            env[key] = f"{env.get(key, '')} {value}".strip() if key == "XLA_FLAGS" else value
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # flags before JAX starts
    isa = "native ISA" if args.isa == "native" else "AVX2 cap: " + ", ".join(AVX2_ENV)
    import jax

    from kvshare_jax import paths
    from kvshare_jax.probes import cpu_model

    res = {
        "command": "python experiments/decode_profile.py " + " ".join(argv),
        "cpu": cpu_model(), "isa": isa, "jax": jax.__version__,
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "peak_gflops": args.peak_gflops or fma_peak_gflops(),
        "ct2": ct2_choice(args.gen_len),
        "profiles": [],
    }  # fmt: skip
    for batch in (int(b) for b in args.batches.split(",")):
        prof = profile(batch, args.gen_len)
        res["profiles"].append(prof)
        print(f"batch {batch}: {prof['tok_s']:.0f} tok/s; ms/step " + ", ".join(
            f"{k} {v:.3f}" for k, v in prof["step_ms"].items()), flush=True)  # fmt: skip
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    out = os.path.join(args.out_dir, args.name)
    paths.write_json(f"{out}.json", res)
    paths.write_text(f"{out}.md", markdown(res))
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
