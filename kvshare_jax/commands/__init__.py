"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``.

One convention for all of them: :class:`~kvshare_jax.config.ArgParser` (``-h`` and
``--help``; dashed flags, ``--eval_steps`` read as ``--eval-steps``; a usage error is one
line and exit 2), ``--config FILE`` plus ``--config.section.field=value`` overrides
where a config is read, and :func:`error` for every other bad input.
"""

from __future__ import annotations

import sys

from kvshare_jax.config import ArgParser, UsageError

__all__ = ["ArgParser", "UsageError", "error"]


def error(prog: str, message: object, status: int = 2) -> int:
    """Prints ``prog: error: message`` as one line to stderr; returns the exit ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status
