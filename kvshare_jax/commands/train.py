"""``kvshare train --config configs/tiny.py --workdir DIR [--config.a.b=value ...]``.

Trains the model of a config file, resuming from ``DIR`` when it holds a checkpoint.
Multi-process jobs pass ``--coordinator_address/--num_processes/--process_id`` (or the
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` variables), or
``--distributed`` to let JAX detect the cluster (TPU pods, SLURM...).

``--init-from SRC`` starts a new run from the weights of a workdir or HuggingFace model
directory (``kvshare convert`` output, say): the model section of the config is replaced
by SRC's model and its ``tokenizer.model`` is used when it has one. A workdir that already
holds a checkpoint resumes from it instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from kvshare_jax.commands import error

PROG = "kvshare train"


def define_flags(argv: list[str]) -> flags.FlagValues:
    """The flags shared by ``kvshare train`` and ``kvshare study``."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "run config file, e.g. configs/tiny.py",
        flag_values=fv,
        sys_argv=argv,  # where the --config.a.b=value overrides are looked up
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_address", "", "host:port of process 0 in a multi-process job", flag_values=fv
    )
    flags.DEFINE_integer("num_processes", 0, "processes in a multi-process job", flag_values=fv)
    flags.DEFINE_integer("process_id", -1, "this process's index in the job", flag_values=fv)
    flags.DEFINE_bool(
        "distributed",
        False,
        "call jax.distributed.initialize() with cluster auto-detection",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    return fv


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def run(argv: list[str]) -> int:
    argv = [PROG, *("--init_from" + a[11:] if a.startswith("--init-from") else a for a in argv)]
    fv = define_flags(argv)
    flags.DEFINE_string(
        "init_from", "", "workdir or HF dir to start from (sets train.init_from)", flag_values=fv
    )
    try:
        fv(argv)
        config = fv.config
        config.train  # noqa: B018 - a config file that failed to load raises here
        if fv.init_from:
            config.train.init_from = fv.init_from
    except (flags.Error, OSError) as e:  # bad flags, unreadable config file
        return _error(e)
    from kvshare_jax import train

    return run_job(PROG, fv, lambda: train.train_and_evaluate(config, fv.workdir))


def run_job(prog: str, fv: flags.FlagValues, job: Callable[[], object]) -> int:
    """Joins the multi-process job the flags of `define_flags` name, then runs ``job``;
    bad input is a one-line error with exit status 2, a non-finite loss status 1."""
    from kvshare_jax import sharding, train

    try:
        sharding.init_distributed(
            fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed
        )
        job()
    except (ValueError, FileNotFoundError) as e:
        return error(prog, e)
    except train.NonFiniteLossError as e:
        return error(prog, e, status=1)
    return 0
