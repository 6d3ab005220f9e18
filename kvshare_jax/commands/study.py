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

from kvshare_jax.commands import error
from kvshare_jax.commands.train import load, parser, run_job

PROG = "kvshare study"


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def run(argv: list[str]) -> int:
    try:
        args, config = load(argv, parser(PROG, __doc__))
        from kvshare_jax import study
        from kvshare_jax.train import check_workdir

        study.plan_cells(config)  # config errors before joining a job or training
        check_workdir(args.workdir)
    except (ValueError, OSError) as e:
        return _error(e)
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
    return run_job(PROG, args, lambda: study.run_study(config, args.workdir))
