"""``kvshare eval --workdir DIR``: validation loss and perplexity of DIR's latest checkpoint.

Uses the run config saved in ``DIR/config.json`` (data, batch size, eval steps); the
mesh defaults to data parallelism over this machine's devices (``--mesh=-1,1,1``).
"""

from __future__ import annotations

import functools
import json

from absl import flags

from kvshare_jax.commands import error

PROG = "kvshare eval"


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory written by kvshare train", flag_values=fv)
    flags.DEFINE_integer(
        "eval_steps", 0, "eval batches (0 = train.eval_steps of the run)", flag_values=fv
    )
    flags.DEFINE_string("split", "", "split to evaluate ('' = data.eval_split)", flag_values=fv)
    flags.DEFINE_list(
        "mesh", ["-1", "1", "1"], "data,fsdp,tensor mesh sizes for evaluation", flag_values=fv
    )
    flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    return fv


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def _mesh_sizes(values: list[str]) -> dict[str, int]:
    if len(values) != 3 or not all(v.lstrip("-").isdigit() for v in values):
        raise ValueError(f"--mesh needs 3 integers data,fsdp,tensor, got {','.join(values)}")
    return dict(zip(("data", "fsdp", "tensor"), map(int, values), strict=True))


def run(argv: list[str]) -> int:
    fv = _define_flags()
    try:
        fv([PROG, *argv])
    except flags.Error as e:
        return _error(e)
    from kvshare_jax import checkpoint, train

    try:
        config = checkpoint.load_run_config(fv.workdir)
        if fv.split:
            config.data.eval_split = fv.split
        config.mesh.update(_mesh_sizes(fv.mesh))
        result = train.evaluate_workdir(config, fv.workdir, fv.eval_steps or None)
    except (ValueError, FileNotFoundError) as e:
        return _error(e)
    if fv.json:
        print(json.dumps(result))
    else:
        print(
            f"{fv.workdir} step {result['step']} ({config.data.eval_split}): "
            f"eval_loss {result['eval_loss']:.4f}, eval_ppl {result['eval_ppl']:.2f}"
        )
    return 0
