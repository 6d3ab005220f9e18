"""``kvshare eval --workdir DIR``: validation loss and perplexity of DIR's latest checkpoint.

Uses the run config saved in ``DIR/config.json`` (data, batch size, eval steps); the
mesh defaults to data parallelism over this machine's devices (``--mesh=-1,1,1``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from kvshare_jax.commands import PREFILL_FLAGS, ArgParser, error
from kvshare_jax.prefill import Prefill

PROG = "kvshare eval"


def parser() -> ArgParser:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory written by kvshare train")
    p.add_argument("--eval-steps", type=int, help="eval batches (default: train.eval_steps)")
    p.add_argument("--split", default="", help="split to evaluate (default: data.eval_split)")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor mesh sizes")
    p.add_argument(
        "--packing",
        choices=["concat", "segments"],
        help="pack the eval rows so (default: the run's data.packing); segments scores every "
        "document alone",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--prefill-passes",
        help="passes of cyclic blocks in the eval forward: exact (train.seq_len passes, the "
        "exact result) or m,b (default: the run's model.forward_passes, backward_passes); "
        "auto needs the decoder (kvshare generate / bench)",
    )
    return p


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def _mesh_sizes(text: str) -> dict[str, int]:
    values = text.split(",")
    if len(values) != 3 or not all(v.strip().lstrip("-").isdigit() for v in values):
        raise ValueError(f"--mesh needs 3 integers data,fsdp,tensor, got {text}")
    return dict(zip(("data", "fsdp", "tensor"), map(int, values), strict=True))


def _set_passes(config, text: str) -> None:
    """Sets ``model.forward_passes, backward_passes`` from ``--prefill-passes``."""
    passes = Prefill.parse(text, names=PREFILL_FLAGS).passes
    if passes == "auto":
        raise ValueError("--prefill-passes=auto needs the decoder; eval takes exact or m,b")
    if passes == "exact":  # t passes of a causal system are exact (docs/design.md §4)
        passes = (int(config.train.seq_len) - 1, 1)
    config.model.forward_passes, config.model.backward_passes = passes


def _evaluate(config: Any, workdir: str, num_batches: int | None) -> dict[str, float]:
    """``train.evaluate_workdir`` with a progress bar over the eval batches: each call of
    the trainer's ``eval_step`` is waited for, then counted."""
    import jax

    from kvshare_jax import checkpoint, progress, train

    trainer = train.Trainer(config, workdir)
    _, params, _, step = checkpoint.open_model(workdir, shardings=trainer.shardings.params)
    num_batches = num_batches or int(config.train.eval_steps)
    eval_step = trainer.eval_step
    with progress.bar(total=num_batches, desc="eval", unit="batch") as bar:

        def counted(*args: Any) -> Any:
            out = jax.device_get(eval_step(*args))
            bar.update(1)
            return out

        trainer.eval_step = counted
        return {"step": step, **trainer.evaluate(params, num_batches)}


def run(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
        if args.eval_steps is not None and args.eval_steps < 1:
            raise ValueError(f"--eval-steps must be >= 1, got {args.eval_steps}")
        mesh = _mesh_sizes(args.mesh)
        from kvshare_jax import checkpoint

        config = checkpoint.load_run_config(args.workdir)
        if args.split:
            config.data.eval_split = args.split
        config.mesh.update(mesh)
        if args.packing:
            config.data.packing = args.packing
        if args.prefill_passes:
            _set_passes(config, args.prefill_passes)
        result = _evaluate(config, args.workdir, args.eval_steps)
    except (ValueError, OSError) as e:
        return _error(e)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.workdir} step {result['step']} ({config.data.eval_split}): "
            f"eval_loss {result['eval_loss']:.4f}, eval_ppl {result['eval_ppl']:.2f}"
        )
    return 0
