"""``kvshare`` entry point: dispatches ``kvshare <command> ...`` to a command module.

Each command lives in ``kvshare_jax/commands/<name>.py`` and exposes
``run(argv: list[str]) -> int``; only the chosen module is imported.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "layout": "print a layout's mapping, KV layers, cyclic blocks and cache fraction",
    "train": "train a model from a config file (resumes from the workdir)",
    "eval": "report validation loss / perplexity of a workdir checkpoint",
    "generate": "generate text from a checkpoint or a random init",
    "bench": "benchmark decode throughput, prefill latency and memory per layout",
    "study": "run the paper's layout study from a study config",
    "convert": "import / export HuggingFace and reference LCKV checkpoints",
    "harness": "evaluate a workdir with lm-eval-harness",
    "compile": "AOT-compile a config for a TPU slice: memory per device, roofline, fit",
}


def _usage() -> str:
    lines = ["usage: kvshare <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, help_ in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    from kvshare_jax.commands import UsageError, error
    from kvshare_jax.target import compile_only_libtpu

    compile_only_libtpu()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kvshare: error: unknown command {name!r} (one of: {', '.join(COMMANDS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        module = importlib.import_module(f"kvshare_jax.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"kvshare_jax.commands.{name}":
            raise
        print(f"kvshare: command {name!r} is not available in this install", file=sys.stderr)
        return 2
    try:
        return module.run(rest)
    except UsageError as e:  # bad flags of a command that parses outside its try block
        return error(f"kvshare {name}", e)
    except SystemExit as e:  # --help (status 0) from a command's parser
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
