"""``kvshare harness --workdir DIR --tasks t1,t2``: lm-eval-harness on DIR's newest checkpoint.

  kvshare harness --workdir DIR --tasks t1,t2 [--include-path path/to/local/tasks]
                  [--limit N] [--batch-size B] [--num-fewshot K] [--tokenizer PATH]
                  [--output FILE]

Task data must be local (no model hub or dataset downloads here): point
``--include-path`` at task YAMLs whose ``dataset_path``/``dataset_kwargs`` read local
files (e.g. ``dataset_path: json`` with ``data_files``), or use tasks whose datasets
are already in the HuggingFace cache and set ``HF_DATASETS_OFFLINE=1``. The tokenizer
is ``DIR/tokenizer.model`` unless ``--tokenizer`` names a SentencePiece file or a
HuggingFace tokenizer dir. Needs the ``[eval]`` extra (lm-eval).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from kvshare_jax import paths
from kvshare_jax.commands import ArgParser, error

PROG = "kvshare harness"
RESULTS_FILE = "harness_results.json"


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def _parser() -> ArgParser:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="workdir (or HuggingFace model dir)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default="", help="folder of local task YAMLs")
    p.add_argument("--limit", type=float, help="examples per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget per request")
    p.add_argument("--tokenizer", default="", help="SentencePiece .model or HF tokenizer dir")
    p.add_argument("--output", default="", help=f"results JSON (default: DIR/{RESULTS_FILE})")
    return p


def _task_manager(task_manager: type, include_path: str, tasks: list[str]) -> Any:
    """A ``TaskManager`` knowing ``tasks``: the local ``include_path`` alone when it has
    them all (indexing lm-eval's ~15k built-in task files takes many seconds), else with
    the built-in tasks too."""
    if include_path:
        manager = task_manager(include_path=include_path, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = task_manager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (check --include-path)")
    return manager


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        from kvshare_jax.lm_eval_adapter import KVShareLM
    except ModuleNotFoundError as e:
        return _error(f"{e}; install the extra: pip install 'kvshare_jax[eval]'")
    if args.include_path and not os.path.isdir(args.include_path):
        return _error(f"--include-path {args.include_path} is not a directory")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        lm = KVShareLM.from_workdir(
            args.workdir, args.tokenizer, args.batch_size, args.max_gen_toks
        )
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manager = _task_manager(TaskManager, args.include_path, tasks)
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    print(make_table(results))
    output = args.output or paths.join(args.workdir, RESULTS_FILE)
    keep = ("results", "versions", "n-shot", "configs", "config")
    text = json.dumps(
        {k: results[k] for k in keep if k in results}, indent=2, default=handle_non_serializable
    )
    paths.write_text(output, text + "\n")
    print(f"results written to {output}")
    return 0
