"""``kvshare layout SPEC [--layers L --kv-layers l]``: describe a layout."""

from __future__ import annotations

from kvshare_jax.commands import ArgParser, error
from kvshare_jax.layout import from_spec
from kvshare_jax.model import ModelConfig, check_passes


def run(argv: list[str]) -> int:
    p = ArgParser(prog="kvshare layout", description=__doc__)
    p.add_argument(
        "spec",
        help="mapping string ('0_6_6_7'), preset ('sandwich-middle') "
        "or method ('cla:2', 'lckv:1', 'yoco', 'mlkv:3', 'standard')",
    )
    p.add_argument("--layers", type=int, help="number of layers L (implied by a mapping string)")
    p.add_argument("--kv-layers", type=int, help="number of KV layers l for the nine presets")
    m, b = (
        ModelConfig.__dataclass_fields__[f].default for f in ("forward_passes", "backward_passes")
    )
    p.add_argument("--forward-passes", type=int, default=m, help="m: passes without gradient")
    p.add_argument("--backward-passes", type=int, default=b, help="b: passes with gradient")
    args = p.parse_args(argv)
    spec = args.spec
    if args.kv_layers is not None and ":" not in spec:
        spec = f"{spec}:{args.kv_layers}"
    try:
        layers = args.layers
        if layers is None:
            from kvshare_jax.layout import mapping_length

            layers = mapping_length(spec)
            if layers is None:
                raise ValueError(f"--layers is required for {args.spec!r}")
        layout = from_spec(spec, layers)
        check_passes((args.forward_passes, args.backward_passes), "--forward/backward-passes")
    except ValueError as e:
        return error("kvshare layout", e)
    print(layout.describe(args.forward_passes, args.backward_passes))
    return 0
