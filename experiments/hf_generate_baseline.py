"""HF transformers ``LlamaForCausalLM.generate`` throughput on the llama_tiny shape.

The baseline that ``experiments/throughput.py`` compares against. Needs the ``[hf]`` extra
(torch 2.13.0 CPU wheel + transformers)::

    .venv/bin/pip install -e ".[hf]"
    .venv/bin/python experiments/hf_generate_baseline.py --batch-sizes 1,32
    .venv/bin/python experiments/throughput.py  # its table and plot include this baseline

Greedy decoding with the KV cache (``use_cache=True``), random weights, fp32, every
sequence forced to generate exactly ``--gen-len`` tokens; tokens/s = batch * gen_len /
wall time of ``generate`` (prefill included), best of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import transformers


def llama_tiny(vocab: int, layers: int, d_model: int, heads: int, kv_heads: int, d_ff: int):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().float()


def time_generate(model, batch: int, prompt_len: int, gen_len: int, repeats: int) -> float:
    """Best wall time of one ``generate`` call (one warm-up call first)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len))
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=gen_len,
        min_new_tokens=gen_len,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            elapsed = time.perf_counter() - start
            assert out.shape == (batch, prompt_len + gen_len), out.shape
            if i:
                best = min(best, elapsed)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default="experiments/results/throughput_hf_baseline.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = llama_tiny(args.vocab, args.layers, args.d_model, args.heads, args.kv_heads, args.d_ff)
    runs = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        t = time_generate(model, b, args.prompt_len, args.gen_len, args.repeats)
        runs.append({"batch": b, "generate_s": t, "e2e_tok_s": b * args.gen_len / t})
        print(f"batch {b:4d}: {t:.3f} s, {runs[-1]['e2e_tok_s']:.1f} tok/s", flush=True)
    result = {
        "meta": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "dtype": "float32",
            "model": vars(args) | {"attn_implementation": model.config._attn_implementation},
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
