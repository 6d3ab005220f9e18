"""TinyLlama-1.1B shape (22 layers, d=2048, 32 heads / 4 KV heads, d_ff 5632, ctx 2048).

Target slice: v5e:4x4 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config


def get_config():
    config = default_config()
    config.model.num_layers = 22  # L
    config.model.layout = "standard"  # e.g. 'sandwich-middle:11'
    config.model.d_model = 2048  # residual width
    config.model.num_heads = 32  # query heads
    config.model.num_kv_heads = 4  # KV heads
    config.model.d_ff = 5632  # SwiGLU width
    config.model.max_len = 2048  # context
    config.model.dtype = "bfloat16"  # compute dtype
    config.model.remat = True  # save activation memory
    config.data.dataset = "huggingface:cerebras__slimpajama_627b"  # prepared TFDS data
    config.data.vocab_size = 32000  # tokenizer vocabulary
    # concat packing (documents share rows and attend across EOS), as HF run_clm and the
    # paper's code: comparable to the paper; "segments" keeps attention in each document
    config.data.packing = "concat"
    config.train.seq_len = 2048  # tokens per sequence
    config.train.batch_size = 256  # global batch
    config.train.grad_accum = 8  # micro-batches of 32: every study layout fits 15.75 GiB/chip
    config.train.num_steps = 50000  # steps
    config.train.learning_rate = 4e-4  # peak LR
    config.train.warmup_steps = 2000  # warm-up
    config.train.eval_every = 2000  # eval interval
    config.train.eval_steps = 50  # eval batches
    config.train.checkpoint_every = 1000  # checkpoint interval
    config.mesh.data = 1  # data axis
    config.mesh.fsdp = -1  # shard parameters over all devices
    config.lock()
    return config
