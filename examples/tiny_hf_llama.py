"""Writes a tiny random-init HuggingFace ``LlamaForCausalLM`` (4 layers, d=64) with a
SentencePiece ``tokenizer.model`` trained on the embedded corpus: a local stand-in for a
hub checkpoint, to try the README's HuggingFace round trip offline.

    python examples/tiny_hf_llama.py OUT_DIR
"""

import sys

import torch
import transformers

from kvshare_jax.data import embedded_documents
from kvshare_jax.data.tokenizer import train_tokenizer


def main(out_dir: str) -> None:
    tokenizer = train_tokenizer(embedded_documents("train")[:200], 1024)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save(f"{out_dir}/tokenizer.model")
    print(f"wrote {out_dir}: vocab {tokenizer.vocab_size}")


if __name__ == "__main__":
    main(sys.argv[1])
