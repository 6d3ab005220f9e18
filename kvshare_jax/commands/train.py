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

import argparse
import functools
import sys
from collections.abc import Callable

import ml_collections

from kvshare_jax.commands import ArgParser, error, parse_with_overrides

PROG = "kvshare train"


def parser(prog: str = PROG, doc: str | None = None) -> ArgParser:
    """The flags shared by ``kvshare train`` and ``kvshare study``."""
    p = ArgParser(prog=prog, description=(doc or __doc__).split("\n\n")[0])
    p.add_argument(
        "--config",
        required=True,
        help="config file (.py with get_config(), or a run's config.json); "
        "overrides: --config.section.field=value",
    )
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics)")
    job = p.add_argument_group("multi-process jobs")
    job.add_argument("--coordinator-address", default="", help="host:port of process 0")
    job.add_argument("--num-processes", type=int, default=0, help="processes in the job")
    job.add_argument("--process-id", type=int, default=-1, help="this process's index")
    job.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with cluster auto-detection",
    )
    return p


def load(
    argv: list[str], p: argparse.ArgumentParser
) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Parses ``argv`` and loads the config with its overrides; raises ``ValueError`` /
    ``FileNotFoundError`` (one line) for any bad argument, file or field value."""
    from kvshare_jax.config import load_config

    args, overrides = parse_with_overrides(argv, p)
    return args, load_config(args.config, overrides)


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def run(argv: list[str]) -> int:
    p = parser()
    p.add_argument("--init-from", default="", help="workdir or HF dir to start from")
    try:
        args, config = load(argv, p)
        if args.init_from:
            config.train.init_from = args.init_from
        from kvshare_jax.config import validate_config
        from kvshare_jax.train import check_workdir

        validate_config(config)  # before joining a job, training a tokenizer or writing
        check_workdir(args.workdir)
    except (ValueError, OSError) as e:
        return _error(e)
    from kvshare_jax import train

    return run_job(PROG, args, lambda: train.train_and_evaluate(config, args.workdir))


def run_job(prog: str, fv: argparse.Namespace, job: Callable[[], object]) -> int:
    """Joins the multi-process job the flags of `parser` name, then runs ``job``;
    bad input (including a workdir in use or with no readable checkpoint) and a failed
    checkpoint save (disk full) are a one-line error with exit status 2, a non-finite
    loss status 1; a preemption (SIGTERM) saves, says so in one line and exits 143."""
    import errno

    from kvshare_jax import integrity, preemption, sharding, train

    try:
        sharding.init_distributed(
            fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed
        )
        job()
    except (ValueError, FileNotFoundError, integrity.CheckpointSaveError) as e:
        return error(prog, e)
    except OSError as e:  # e.g. metrics.jsonl on a full disk; checkpoints stay intact
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        return error(prog, e)
    except train.NonFiniteLossError as e:
        return error(prog, e, status=1)
    except preemption.PreemptedError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return preemption.EXIT_STATUS
    return 0
