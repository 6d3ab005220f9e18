"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``.

One convention for all of them: :class:`~kvshare_jax.config.ArgParser` (``-h`` and
``--help``; dashed flags, ``--eval_steps`` read as ``--eval-steps``; a usage error is one
line and exit 2), ``--config FILE`` plus ``--config.section.field=value`` overrides
where a config is read, and :func:`error` for every other bad input.
"""

from __future__ import annotations

import argparse
import sys

from kvshare_jax.config import ArgParser, UsageError
from kvshare_jax.prefill import DEFAULT_TOL, Prefill

__all__ = ["ArgParser", "UsageError", "add_prefill_flags", "error", "prefill_from_flags"]
PREFILL_FLAGS = ("--prefill-passes", "--prefill-tol")


def error(prog: str, message: object, status: int = 2) -> int:
    """Prints ``prog: error: message`` as one line to stderr; returns the exit ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def add_prefill_flags(p: argparse.ArgumentParser) -> None:
    """``--prefill-passes`` and ``--prefill-tol`` (``kvshare generate`` and ``bench``)."""
    p.add_argument(
        PREFILL_FLAGS[0],
        help="iteration of cyclic blocks over the prompt: auto (default: until the upward "
        f"KVs change by at most {PREFILL_FLAGS[1]}, at most the prompt length), exact (until "
        "they stop changing) or m,b fixed passes (m + b >= prompt length is exact)",
    )
    p.add_argument(PREFILL_FLAGS[1], help=f"tolerance of auto (default {DEFAULT_TOL:g})")


def prefill_from_flags(args: argparse.Namespace) -> Prefill:
    """The :class:`~kvshare_jax.prefill.Prefill` of `add_prefill_flags`'s flags (a
    one-line ``ValueError`` naming the flag when they are bad)."""
    return Prefill.parse(args.prefill_passes, args.prefill_tol, PREFILL_FLAGS)
