"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``."""

from __future__ import annotations

import argparse
import sys


def error(prog: str, message: object, status: int = 2) -> int:
    """Prints ``prog: error: message`` as one line to stderr; returns the exit ``status``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def parse_with_overrides(
    argv: list[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """Flags plus ``--config.a.b=value`` overrides (returned as ``"config.a.b=value"``
    without the dashes); raises ``ValueError`` on other unknown flags."""
    args, rest = parser.parse_known_args(argv)
    overrides = tuple(a.removeprefix("--") for a in rest if a.startswith("--config."))
    if len(overrides) != len(rest):
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    return args, overrides
