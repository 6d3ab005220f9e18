"""``kvshare convert``: import a HuggingFace checkpoint into a workdir, or export one.

  kvshare convert --from-hf DIR --workdir OUT [--layout SPEC --kv-init copy|average
                  --sliding-window W]
  kvshare convert --to-hf OUTDIR --workdir DIR

Import reads ``llama`` and reference ``lckv-llama`` directories (``config.json`` plus
safetensors, sharded or not, or ``pytorch_model.bin``); ``--layout`` moves the model to
another KV layout for uptraining. Export writes ``llama`` for the standard layout and
``lckv-llama`` otherwise. Needs the ``[hf]`` extra (torch, safetensors).
"""

from __future__ import annotations

import functools

from kvshare_jax.commands import ArgParser, error

PROG = "kvshare convert"


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def _parser() -> ArgParser:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="HuggingFace model dir to import")
    direction.add_argument("--to-hf", metavar="OUTDIR", help="HuggingFace dir to export to")
    p.add_argument("--workdir", required=True, help="workdir to create (import) or read (export)")
    p.add_argument(
        "--layout",
        default="",
        help="import into this KV layout: preset ('sandwich-middle:11', 'cla:2', 'yoco') "
        "or mapping string ('0_2_2_3')",
    )
    p.add_argument(
        "--kv-init",
        choices=("copy", "average"),
        default="copy",
        help="K/V weights of the new KV layers: their own (copy) or the mean over the "
        "layers reading them (average)",
    )
    p.add_argument(
        "--sliding-window", type=int, help="window of 's' layers (default: from config.json)"
    )
    return p


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.to_hf and (args.layout or args.sliding_window):
        return _error("--layout and --sliding-window apply to --from-hf only")
    try:
        from kvshare_jax import convert

        if args.from_hf:
            cfg = convert.import_hf(
                args.from_hf, args.workdir, args.layout, args.kv_init, args.sliding_window
            )
            print(
                f"{args.from_hf} -> {args.workdir}: {cfg.num_layers} layers, layout "
                f"{cfg.layout} ({cfg.layout.num_kv_layers} KV layers), vocab {cfg.vocab_size}"
            )
        else:
            hf = convert.export_hf(args.workdir, args.to_hf)
            print(f"{args.workdir} -> {args.to_hf}: model_type {hf['model_type']}")
    except ModuleNotFoundError as e:
        return _error(f"{e}; install the extra: pip install 'kvshare_jax[hf]'")
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        return _error(e)
    return 0
