"""Generation throughput against peers: HF ``generate``, CTranslate2 and kvshare_jax.

All three run the same random HF Llama checkpoint (default: the llama_tiny shape, L=8,
d=512, 8/8 heads, d_ff 1376, vocab 32000, fp32), built here with transformers and saved
with ``save_pretrained``; CTranslate2 gets it through ``TransformersConverter`` (float32)
and kvshare_jax through ``kvshare_jax.convert.import_hf``. Each system takes the same
random prompts and generates ``--gen-len`` greedy tokens (no stop token, so every
sequence runs to the end); tokens/s = ``batch * gen_len / wall time``, prefill included,
best of ``--repeats`` rounds that interleave the systems and batch sizes, after one
untimed warm-up (compilation) per system and batch. Each system runs in a process of its
own (loaded together, torch halved CTranslate2's speed at batch 1) and sits idle for
``--pause`` seconds before each timed run. The run records whether
the three emitted the same tokens, and the 1-minute load average before and after.

Needs the ``[hf]`` and ``[peer]`` extras (torch, transformers, ctranslate2)::

    .venv/bin/pip install -e ".[hf,peer]"
    .venv/bin/python experiments/peer_throughput.py            # batch 1, 8, 32
    .venv/bin/python experiments/peer_throughput.py --batch-sizes 1 --repeats 1

Writes ``<out-dir>/<name>.{json,md,png}`` (default ``experiments/results/peer_throughput_cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SYSTEMS = ("hf", "ct2", "kvshare")
LABELS = {"hf": "HF generate", "ct2": "CTranslate2", "kvshare": "kvshare_jax"}
LLAMA_TINY = dict(layers=8, d_model=512, heads=8, kv_heads=8, d_ff=1376, vocab=32000)
# --isa avx2: every system capped at AVX2 on an AVX-512 host (the runners inherit these)
AVX2_ENV = {
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",  # XLA:CPU codegen and its dot kernels
    "KVSHARE_CPU_ISA": "avx2",  # the CPU matvec kernel built with -mno-avx512f
    "CT2_FORCE_CPU_ISA": "AVX2",  # CTranslate2's own kernels
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN, CTranslate2's SGEMM backend (and torch's)
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorized kernels
}


def cap_isa(isa: str) -> str:
    """Sets the environment of ``--isa`` for this process and the runners; its label."""
    if isa == "native":
        return "native"
    for key, value in AVX2_ENV.items():
        old = os.environ.get(key, "")
        os.environ[key] = f"{old} {value}".strip() if key == "XLA_FLAGS" else value
    return "AVX2 cap (" + ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ")"


# ------------------------------------------------------------- checkpoints
def build_hf(out_dir: str, *, seed: int = 0, **shape: int) -> str:
    """Saves a random fp32 ``LlamaForCausalLM`` of ``shape`` (the keys of ``LLAMA_TINY``)
    to ``out_dir`` (once)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(out_dir)
    return out_dir


class _IdVocab:
    """Stands in for a tokenizer in the CTranslate2 converter: token ``i`` is ``"<i>"``."""

    bos_token, eos_token, unk_token = "<1>", "<2>", "<0>"

    def __init__(self, size: int):
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.size)}


def convert_ct2(hf_dir: str, out_dir: str) -> str:
    """Converts ``hf_dir`` to a float32 CTranslate2 model in ``out_dir`` (once)."""
    if os.path.exists(os.path.join(out_dir, "model.bin")):
        return out_dir
    import ctranslate2
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(hf_dir).vocab_size

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _IdVocab(vocab)

    Converter(hf_dir).convert(out_dir, quantization="float32", force=True)
    return out_dir


# ----------------------------------------------------------------- systems
Runner = Callable[[np.ndarray], np.ndarray]  # prompts [b, t] int -> new tokens [b, n]


def hf_runner(hf_dir: str, gen_len: int, threads: int) -> Runner:
    """HF ``generate``: greedy, KV cache, no EOS (every sequence runs ``gen_len`` steps)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no stop, and no EOS suppression either

    def run(prompts: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(prompts.astype(np.int64))
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=gen_len,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[:, prompts.shape[1] :].numpy()

    return run


def ct2_runner(ct2_dir: str, gen_len: int, threads: int) -> Runner:
    """CTranslate2 ``Generator.generate_batch``, float32, greedy, the prompt forwarded at
    once (``include_prompt_in_result=False``), no end token."""
    import ctranslate2

    gen = ctranslate2.Generator(
        ct2_dir, device="cpu", compute_type="float32", intra_threads=threads, inter_threads=1
    )

    def run(prompts: np.ndarray) -> np.ndarray:
        start = [[f"<{int(i)}>" for i in row] for row in prompts]
        results = gen.generate_batch(
            start,
            max_length=gen_len,
            sampling_topk=1,
            beam_size=1,
            end_token=[],
            include_prompt_in_result=False,
        )
        return np.array([r.sequences_ids[0] for r in results])

    return run


def kvshare_runner(hf_dir: str, workdir: str, gen_len: int) -> Runner:
    """kvshare_jax: ``kvshare_jax.convert.import_hf`` of the checkpoint, then the jitted
    generation program (prefill + decode scan), greedy, no stop token."""
    import jax
    import jax.numpy as jnp

    from kvshare_jax import checkpoint, convert, decode

    if not os.path.exists(os.path.join(workdir, "config.json")):
        convert.import_hf(hf_dir, workdir)
    cfg, params, _, _ = checkpoint.open_model(workdir)
    fn = decode.generate_fn(cfg, max_new_tokens=gen_len)
    rng = jax.random.key(0)

    def run(prompts: np.ndarray) -> np.ndarray:
        b, t = prompts.shape
        cache = decode.init_cache(cfg, b, t + gen_len - 1)
        lengths = jnp.full((b,), t, jnp.int32)
        out, _ = fn(params, cache, jnp.asarray(prompts, jnp.int32), lengths, rng)
        return np.asarray(out.tokens)

    return run


# ------------------------------------------------- one process per system
def system_dir(cache_dir: str, hf_dir: str, system: str) -> str:
    """Where ``system``'s copy of the checkpoint ``hf_dir`` (``<cache_dir>/hf_<shape>``)
    lives: ``<cache_dir>/<system>_<shape>``."""
    tag = os.path.basename(hf_dir.rstrip("/")).removeprefix("hf_")
    return os.path.join(cache_dir, f"{system}_{tag}")


def make_runner(system: str, hf_dir: str, cache_dir: str, gen_len: int, threads: int) -> Runner:
    """The runner of ``system`` (``hf``, ``ct2`` or ``kvshare``) for the checkpoint ``hf_dir``."""
    if system == "hf":
        return hf_runner(hf_dir, gen_len, threads)
    if system == "ct2":
        ct2_dir = convert_ct2(hf_dir, system_dir(cache_dir, hf_dir, "ct2"))
        return ct2_runner(ct2_dir, gen_len, threads)
    return kvshare_runner(hf_dir, system_dir(cache_dir, hf_dir, "kvshare"), gen_len)


def _serve(conn: Any, *args: Any) -> None:
    """Worker loop: builds one runner, then answers prompts with tokens until ``None``."""
    try:
        run = make_runner(*args)
        conn.send(("ready", None))
        while (prompts := conn.recv()) is not None:
            conn.send(("ok", run(prompts)))
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))


class ProcessRunner:
    """A runner living in its own process. Loaded into one process, torch and CTranslate2
    slow each other down (their OpenMP runtimes): CTranslate2 ran at half speed at batch 1
    next to torch, so each system gets a process of its own."""

    def __init__(self, system: str, *args: Any):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.system, (self.conn, child) = system, ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, system, *args), daemon=True)
        self.process.start()
        self._reply()

    def _reply(self) -> Any:
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.system} worker failed: {value}")
        return value

    def __call__(self, prompts: np.ndarray) -> np.ndarray:
        self.conn.send(prompts)
        return self._reply()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
        self.process.join(timeout=30)


# ------------------------------------------------------------------- bench
def roofline(hf_dir: str, cache_dir: str, row: dict[str, Any], meta: dict[str, Any]) -> dict:
    """kvshare_jax's batch-``row`` throughput against the memory-bandwidth roofline: the
    bytes a decode step must read (every weight but the embedding table, plus the cache;
    `kvshare_jax.bench.decode_step_bytes`) over the best streaming read bandwidth. The
    measured time per token includes the prefill, so the fraction is a lower bound."""
    from kvshare_jax import bench, checkpoint, probes

    cfg, params, _, _ = checkpoint.open_model(system_dir(cache_dir, hf_dir, "kvshare"))
    b, cache_len = row["batch"], meta["prompt_len"] + meta["gen_len"] - 1
    step_bytes = bench.decode_step_bytes(cfg, params, b, cache_len)
    bandwidth = probes.read_bandwidth()
    roof_tok_s = b * bandwidth["best"] / step_bytes
    return {
        "batch": b,
        "step_bytes": step_bytes,
        "bandwidth": bandwidth,
        "roofline_tok_s": roof_tok_s,
        # measured tok/s over the roofline's, prefill included in the measured time
        "fraction": {name: tok_s / roof_tok_s for name, tok_s in row["tok_s"].items()},
    }


def load_average() -> float:
    return os.getloadavg()[0]


def bench(
    runners: dict[str, Runner],
    prompts: np.ndarray,
    batch_sizes: list[int],
    repeats: int,
    progress: bool = True,
    pause: float = 0.0,
) -> dict[str, Any]:
    """Warm-up per system and batch, then ``repeats`` interleaved rounds; best times.

    ``pause`` seconds of sleep before each timed run let the previous system's thread
    pool go idle: OpenMP workers (torch, CTranslate2) spin-wait for up to 200 ms after a
    parallel region and would otherwise take cores from the next system."""
    tokens: dict[int, dict[str, np.ndarray]] = {b: {} for b in batch_sizes}
    for b in batch_sizes:
        for name, run in runners.items():
            tokens[b][name] = run(prompts[:b])
    best = {b: dict.fromkeys(runners, float("inf")) for b in batch_sizes}
    for r in range(repeats):
        for b in batch_sizes:
            for name, run in runners.items():
                time.sleep(pause)
                start = time.perf_counter()
                out = run(prompts[:b])
                elapsed = time.perf_counter() - start
                best[b][name] = min(best[b][name], elapsed)
                if not np.array_equal(out, tokens[b][name]):
                    raise RuntimeError(f"{name} is not deterministic at batch {b}")
                if progress:
                    print(f"round {r + 1} batch {b} {name}: {elapsed:.3f} s", file=sys.stderr)
    names = list(runners)
    rows = []
    for b in batch_sizes:
        n = tokens[b][names[0]].shape[1]
        ref = tokens[b][names[0]]
        rows.append(
            {
                "batch": b,
                "seconds": best[b],
                "tok_s": {k: b * n / s for k, s in best[b].items()},
                "tokens_match": all(np.array_equal(tokens[b][k], ref) for k in names),
                "token_agreement": {
                    k: float(np.mean(tokens[b][k] == ref)) for k in names if k != names[0]
                },
            }
        )
    return {"rows": rows}


def markdown(results: dict[str, Any]) -> str:
    from kvshare_jax.tables import markdown_table

    meta = results["meta"]
    names = meta["systems"]
    ratio = (
        [f"kvshare vs {LABELS[k]}" for k in names if k != "kvshare"] if "kvshare" in names else []
    )
    lines = [
        f"Generation throughput, {meta['model_text']}, prompt {meta['prompt_len']} + "
        f"{meta['gen_len']} greedy tokens, prefill included, best of {meta['repeats']} "
        f"interleaved rounds, one process per system, {meta.get('pause_s', 0):g} s idle before "
        "each timed run; "
        f"{meta.get('cpu_model', 'CPU')}, {meta['cpu_count']} cores, {meta['threads']} threads, "
        f"ISA {meta.get('isa', 'native')}; "
        f"1-min load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after.",
        "",
    ]
    table = []
    for row in results["rows"]:
        tok = row["tok_s"]
        cells = [row["batch"], *(f"{tok[k]:.0f}" for k in names)]
        cells += (
            [f"{tok['kvshare'] / tok[k]:.2f}x" for k in names if k != "kvshare"] if ratio else []
        )
        table.append([*cells, "yes" if row["tokens_match"] else "no"])
    header = ["batch", *(f"{LABELS[k]} tok/s" for k in names), *ratio, "same tokens"]
    lines += markdown_table(header, table)
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines += ["", f"Versions: {versions}."]
    if "roofline" in results:
        r = results["roofline"]
        bw = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["bandwidth"].items() if k != "best")
        lines += [
            "",
            f"Memory-bandwidth roofline at batch {r['batch']}: a decode step reads "
            f"{r['step_bytes'] / 1e6:.1f} MB (weights without the embedding table, plus the "
            f"cache); best streaming read {r['bandwidth']['best'] / 1e9:.1f} GB/s (1 GiB, "
            f"{bw} GB/s; sum and gemv by XLA, matvec by the CPU kernel) -> "
            f"{r['roofline_tok_s']:.0f} tok/s. Measured tok/s over that "
            "roofline (prefill included): "
            + ", ".join(f"{LABELS[k]} {100 * f:.0f}%" for k, f in r["fraction"].items())
            + ". Above 100% means part of the weights came from the last-level cache.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Grouped bars: tokens/s of each system at each batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvshare_jax import plotting

    names, rows = results["meta"]["systems"], results["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        color = f"C{i}"  # a system missing at a batch size is marked "n/a", not a 0 bar
        values = [r["tok_s"].get(name) for r in rows]
        plotting.bars(ax, xs, values, width, color=color, label=LABELS[name])
    ax.set_xticks(range(len(rows)), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("tokens/s (prefill included)")
    meta = results["meta"]
    ax.set_title(
        f"{meta['model_text']}, {meta['prompt_len']} + {meta['gen_len']} tokens, fp32, "
        f"{meta['threads']} threads, load {meta['load_before']:.1f}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions(systems: list[str]) -> dict[str, str]:
    import importlib.metadata as md

    pkgs = {"hf": ["torch", "transformers"], "ct2": ["ctranslate2"], "kvshare": ["jax"]}
    return {p: md.version(p) for s in systems for p in pkgs[s]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="subset of hf,ct2,kvshare")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="HF and CT2 threads")
    p.add_argument("--pause", type=float, default=1.0, help="seconds idle before each timed run")
    p.add_argument("--shape", default="", help="k=v overrides of the llama_tiny shape")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peer_throughput"))
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--name", default="peer_throughput_cpu")
    p.add_argument(
        "--isa", choices=("native", "avx2"), default="native", help="avx2: cap every system at AVX2"
    )
    args = p.parse_args(argv)
    isa = cap_isa(args.isa)
    systems = [s for s in args.systems.split(",") if s]
    if not systems or any(s not in SYSTEMS for s in systems):
        p.error(f"--systems must name some of {', '.join(SYSTEMS)}")
    shape = dict(LLAMA_TINY)
    for item in filter(None, args.shape.split(",")):
        key, value = item.split("=")
        shape[key] = int(value)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    tag = "_".join(f"{k}{v}" for k, v in shape.items())
    hf_dir = build_hf(os.path.join(args.cache_dir, f"hf_{tag}"), **shape)
    runners = {
        s: ProcessRunner(s, hf_dir, args.cache_dir, args.gen_len, args.threads)
        for s in SYSTEMS
        if s in systems
    }
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, shape["vocab"], (max(batch_sizes), args.prompt_len))
    load_before = load_average()
    try:
        results = bench(runners, prompts, batch_sizes, args.repeats, pause=args.pause)
    finally:
        for runner in runners.values():
            runner.close()
    from kvshare_jax.probes import cpu_model

    model_text = (
        f"random Llama L={shape['layers']}, d={shape['d_model']}, "
        f"{shape['heads']}/{shape['kv_heads']} heads, d_ff {shape['d_ff']}, "
        f"vocab {shape['vocab']}"
    )
    results["meta"] = {
        "systems": list(runners),
        "model": shape,
        "model_text": model_text,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "threads": args.threads,
        "pause_s": args.pause,
        "cpu_model": cpu_model(),
        "isa": isa,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "versions": versions(list(runners)),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if "kvshare" in runners and 1 in batch_sizes:
        row = next(r for r in results["rows"] if r["batch"] == 1)
        results["roofline"] = roofline(hf_dir, args.cache_dir, row, results["meta"])
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, args.name)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    text = markdown(results)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    plot(results, base + ".png")
    print(text)
    ok = all(r["tokens_match"] for r in results["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
