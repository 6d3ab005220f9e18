"""CPU study with 3 seeds: the cpu.py model, shorter, each cell trained on 3 seeds.

Standard + the nine presets at l = L/2 = 3 of a 6-layer d=128 model on the embedded
corpus (no download), 100 steps per cell, every cell trained with train.seed 0, 1 and 2
(the init and the data order); the report gives means with 95% intervals and paired
tests against standard (results: experiments/results/study_cpu_seeds/)::

    kvshare study --config configs/study/cpu_seeds.py --workdir runs/study_cpu_seeds

Target slice: v5e:1x1 (checked by tests/test_configs_fit.py; `kvshare compile` plans others).
"""

import os

from kvshare_jax.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(__file__), "cpu.py"))
    config.train.num_steps = 100  # steps per cell and seed
    config.train.warmup_steps = 10  # warm-up
    config.train.checkpoint_every = 50  # checkpoint interval
    s = config.study
    s.seeds = 3  # seeds per cell: intervals and paired tests need >= 2
    s.gen_len = 64  # generated tokens
    s.memory_budget = "16MiB"  # program memory for the max-batch run
    s.train_step_timing_steps = 5  # timed train steps per cell
    return config
