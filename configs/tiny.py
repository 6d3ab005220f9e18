"""CPU-sized config: trains on the embedded corpus in a few minutes on 2 cores.

Target slice: v5e:1x1 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config


def get_config():
    config = default_config()
    config.model.num_layers = 4  # L
    config.model.layout = "standard"  # try 'sandwich-middle:2'
    config.model.d_model = 128  # residual width
    config.model.num_heads = 4  # query heads
    config.model.num_kv_heads = 2  # KV heads
    config.model.d_ff = 352  # SwiGLU width
    config.model.max_len = 256  # context
    config.model.forward_passes = 3  # m (short sequences converge quickly)
    config.model.backward_passes = 2  # b
    config.data.vocab_size = 1024  # small tokenizer
    config.data.tokenizer_train_docs = 4000  # docs for tokenizer training
    config.train.seq_len = 128  # tokens per sequence
    config.train.batch_size = 8  # global batch
    config.train.num_steps = 300  # steps
    config.train.learning_rate = 3e-3  # peak LR
    config.train.warmup_steps = 30  # warm-up
    config.train.eval_every = 100  # eval interval
    config.train.eval_steps = 4  # eval batches
    config.train.checkpoint_every = 100  # checkpoint interval
    config.lock()
    return config
