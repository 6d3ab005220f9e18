"""The paper's 110M Llama shape (12 layers, d=768, 12 heads / 6 KV heads, ctx 1024).

Target slice: v5e:2x2 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config


def get_config():
    config = default_config()
    config.model.num_layers = 12  # L
    config.model.layout = "standard"  # e.g. 'sandwich-middle:6'
    config.model.d_model = 768  # residual width
    config.model.num_heads = 12  # query heads
    config.model.num_kv_heads = 6  # KV heads
    config.model.d_ff = 2048  # SwiGLU width
    config.model.max_len = 1024  # context
    config.model.dtype = "bfloat16"  # compute dtype on accelerators
    config.data.dataset = "huggingface:jeankaddour__minipile"  # prepared TFDS data (README)
    config.data.vocab_size = 32000  # tokenizer vocabulary
    # concat packing (documents share rows and attend across EOS), as HF run_clm and the
    # paper's code: comparable to the paper; "segments" keeps attention in each document
    config.data.packing = "concat"
    config.train.seq_len = 1024  # tokens per sequence
    config.train.batch_size = 128  # global batch
    config.train.grad_accum = 4  # micro-batches of 32: fits a v5e chip with xla attention too
    config.train.num_steps = 20000  # steps
    config.train.learning_rate = 3e-4  # peak LR
    config.train.warmup_steps = 2000  # warm-up
    config.train.eval_every = 1000  # eval interval
    config.train.eval_steps = 50  # eval batches
    config.train.checkpoint_every = 1000  # checkpoint interval
    config.lock()
    return config
