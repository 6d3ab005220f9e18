"""``kvshare study --config configs/study/cpu.py --workdir DIR [--config.a.b=value ...]``.

Trains, evaluates and benchmarks every (layout, l) cell of a study config under
``DIR/cells/`` and writes ``DIR/report.md``, ``DIR/results.json`` and the figures.
Rerunning skips finished cells and resumes an interrupted one. Multi-process flags as
for ``kvshare train`` (``--distributed``...). Compiled programs are cached in
``DIR/jax_cache`` unless a JAX compilation cache is already configured.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from kvshare_jax.commands.train import define_flags

PROG = "kvshare study"


def _error(message: object, status: int = 2) -> int:
    """Prints ``message`` as one line to stderr; returns the exit status."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def run(argv: list[str]) -> int:
    argv = [PROG, *argv]
    fv = define_flags(argv)
    try:
        fv(argv)
        config = fv.config
        config.train  # noqa: B018 - a config file that failed to load raises here
    except (flags.Error, OSError) as e:  # bad flags, unreadable config file
        return _error(e)
    import jax

    from kvshare_jax import sharding, study, train

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(fv.workdir, "jax_cache"))
    try:
        study.plan_cells(config)  # config errors before joining a job or training
        sharding.init_distributed(
            fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed
        )
        study.run_study(config, fv.workdir)
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    except train.NonFiniteLossError as e:
        return _error(e, status=1)
    return 0
