"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``."""

from __future__ import annotations

import sys


def error(prog: str, message: object, status: int = 2) -> int:
    """Prints ``prog: error: message`` as one line to stderr; returns the exit ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status
