"""The 8-layer d=512 Llama shape of the decode benchmarks (vocab 32000, fp32).

``kvshare bench --config configs/llama_tiny.py`` compares layouts on this shape;
``experiments/hf_generate_baseline.py`` times HF ``LlamaForCausalLM`` on the same one.

Target slice: v5e:1x1 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config


def get_config():
    config = default_config()
    config.model.num_layers = 8  # L
    config.model.layout = "standard"  # e.g. 'pizza-bottom:4'
    config.model.d_model = 512  # residual width
    config.model.num_heads = 8  # query heads
    config.model.num_kv_heads = 8  # KV heads (no GQA, like the HF baseline)
    config.model.d_ff = 1376  # SwiGLU width
    config.model.max_len = 2048  # context (16 + 128 on CPU, 512 + 1024 on accelerators)
    config.model.dtype = "float32"  # compute dtype
    config.data.vocab_size = 32000  # Llama tokenizer size
    config.lock()
    return config
