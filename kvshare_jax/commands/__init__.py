"""One module per ``kvshare`` command, each exposing ``run(argv) -> int``.

One convention for all of them: :class:`ArgParser` (``-h`` and ``--help``; dashed flags,
``--eval_steps`` read as ``--eval-steps``; a usage error is one line and exit 2),
``--config FILE`` plus ``--config.section.field=value`` overrides where a config is read
(:func:`parse_with_overrides`), and :func:`error` for every other bad input. The prefill
flags of ``generate`` and ``bench``: :func:`add_prefill_flags`, :func:`prefill_from_flags`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from kvshare_jax.prefill import DEFAULT_TOL, Prefill

PREFILL_FLAGS = ("--prefill-passes", "--prefill-tol")


class UsageError(ValueError):
    """Bad command-line arguments (printed as one line, exit status 2)."""


class ArgParser(argparse.ArgumentParser):
    """``argparse`` with one-line usage errors raised as :class:`UsageError`, and flags
    spelled with underscores (``--max_new_tokens``) read as their dashed form; the
    parser of every ``kvshare`` command. Its description may be a docstring's first
    paragraph: ``literal`` markup is shown plainly."""

    def __init__(self, *args: Any, description: str | None = None, **kwargs: Any):
        if description is not None:
            description = description.replace("``", "")
        super().__init__(*args, description=description, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's API
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([_dashed(a) for a in args], namespace)


def _dashed(arg: str) -> str:
    if not arg.startswith("--") or arg.startswith("--config."):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


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
