"""The paper's 110M setting: configs/llama_110m.py (12 layers, MiniPile) at l = 6, 3, 2.

Standard + the nine presets at each l: 28 cells, 24 training runs of 20k steps (pizza
and sandwich coincide at l = 2, lasagna-middle and lasagna-bottom at l = 6). On a GPU/TPU
host, with MiniPile prepared (see README)::

    kvshare study --config configs/study/llama_110m.py --workdir runs/study_110m

Target slice: v5e:2x2 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

import os

from kvshare_jax.config import load_config
from kvshare_jax.layout import PRESETS, STANDARD
from kvshare_jax.study import study_section


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "llama_110m.py"))
    config.unlock()
    config.study = s = study_section()  # fields: kvshare_jax/study.py::study_section
    s.layouts = (STANDARD, *PRESETS)  # the baseline + all nine presets
    s.kv_layers = (6, 3, 2)  # l = L/2, L/4, 2
    s.memory_budget = "8GiB"  # generation program memory for the max-batch run
    s.bench_batch_sizes = (1,)  # prefill latency at batch 1
    s.prompt_len = 64  # prompt tokens
    s.gen_len = 960  # generated tokens (prompt + generated = model.max_len)
    s.train_step_timing_steps = 20  # timed train steps per cell
    config.lock()
    return config
