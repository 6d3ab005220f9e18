"""``kvshare study --config configs/study/cpu.py --workdir DIR [--config.a.b=value ...]``.

Trains, evaluates and benchmarks every (layout, l) cell of a study config under
``DIR/cells/`` and writes ``DIR/report.md``, ``DIR/results.json`` and the figures.
Rerunning skips finished cells and resumes an interrupted one. Multi-process flags as
for ``kvshare train`` (``--distributed``...). Compiled programs are cached in
``DIR/jax_cache`` unless a JAX compilation cache is already configured.
"""

from __future__ import annotations

import functools
import os

from absl import flags

from kvshare_jax.commands import error
from kvshare_jax.commands.train import define_flags, run_job

PROG = "kvshare study"


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


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

    from kvshare_jax import study

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(fv.workdir, "jax_cache"))
    try:
        study.plan_cells(config)  # config errors before joining a job or training
    except ValueError as e:
        return _error(e)
    return run_job(PROG, fv, lambda: study.run_study(config, fv.workdir))
