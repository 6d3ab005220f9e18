"""CPU study: standard + the nine presets at l = L/2 = 3 of a 6-layer d=128 model.

Trains on the embedded corpus (no download); 28 minutes on an idle 2-core CPU (results:
experiments/results/study_cpu/)::

    kvshare study --config configs/study/cpu.py --workdir runs/study_cpu

Add l = 2 (six more cells; pizza and sandwich coincide there) with
``--config.study.kv_layers='(3,2)'``.

Target slice: v5e:1x1 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

from kvshare_jax.config import default_config
from kvshare_jax.layout import PRESETS, STANDARD
from kvshare_jax.study import study_section


def get_config():
    config = default_config()
    config.model.num_layers = 6  # L
    config.model.d_model = 128  # residual width
    config.model.num_heads = 4  # query heads
    config.model.num_kv_heads = 2  # KV heads
    config.model.d_ff = 352  # SwiGLU width
    config.model.max_len = 256  # context
    config.model.forward_passes = 3  # m (short sequences converge quickly)
    config.model.backward_passes = 2  # b
    config.model.attention_impl = "xla"  # reference attention (CPU)
    config.data.vocab_size = 1024  # small tokenizer
    config.data.tokenizer_train_docs = 4000  # docs for tokenizer training (all of them)
    # concat packing (documents share rows and attend across EOS), as HF run_clm and the
    # paper's code: comparable to the paper; "segments" keeps attention in each document
    config.data.packing = "concat"
    config.train.seq_len = 128  # tokens per sequence
    config.train.batch_size = 8  # global batch
    config.train.num_steps = 150  # steps per cell (about 150k tokens)
    config.train.learning_rate = 3e-3  # peak LR
    config.train.warmup_steps = 15  # warm-up
    config.train.log_every = 25  # log interval
    config.train.eval_every = 0  # evaluate after the last step only
    config.train.eval_steps = 16  # eval batches (about the whole validation split)
    config.train.checkpoint_every = 50  # checkpoint interval
    config.unlock()
    config.study = s = study_section()  # fields: kvshare_jax/study.py::study_section
    s.layouts = (STANDARD, *PRESETS)  # the baseline + all nine presets
    s.kv_layers = (3,)  # l = L/2
    s.memory_budget = "24MiB"  # program memory for the max-batch run
    s.bench_batch_sizes = (1,)  # prefill latency at batch 1
    s.prompt_len = 16  # prompt tokens
    s.gen_len = 128  # generated tokens
    s.train_step_timing_steps = 10  # timed train steps per cell
    config.lock()
    return config
