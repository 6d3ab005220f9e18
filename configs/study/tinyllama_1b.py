"""The paper's 1.1B setting: configs/tinyllama_1b.py (22 layers, SlimPajama) at l = 11, 6, 3.

Standard + the nine presets at each l: 28 cells, 27 training runs of 50k steps
(lasagna-middle and lasagna-bottom coincide at l = 11). A pod-scale job; every host runs
``kvshare study --distributed --config configs/study/tinyllama_1b.py --workdir DIR`` with
DIR on a filesystem all hosts share (e.g. through ``experiments/launch_tpu.py``).

Target slice: v5e:4x4 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

import os

from kvshare_jax.config import load_config
from kvshare_jax.layout import PRESETS, STANDARD
from kvshare_jax.study import study_section


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "tinyllama_1b.py"))
    config.unlock()
    config.study = s = study_section()  # fields: kvshare_jax/study.py::study_section
    s.layouts = (STANDARD, *PRESETS)  # the baseline + all nine presets
    s.kv_layers = (11, 6, 3)  # l = L/2, about L/4, about L/8
    s.memory_budget = "24GiB"  # generation program memory for the max-batch run
    s.bench_batch_sizes = (1,)  # prefill latency at batch 1
    s.prompt_len = 512  # prompt tokens
    s.gen_len = 1536  # generated tokens (prompt + generated = model.max_len)
    s.train_step_timing_steps = 20  # timed train steps per cell
    config.lock()
    return config
