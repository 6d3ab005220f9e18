"""``kvshare generate``: continue a prompt with a checkpoint or a randomly initialised model.

    kvshare generate --workdir DIR --prompt "Once upon a time" --max-new-tokens 64
    kvshare generate --config configs/tiny.py --prompt-ids 1,2,3 --temperature 0.8 --top-k 40

``--workdir`` loads the newest checkpoint and its tokenizer (text in, text out; the
tokenizer's end-of-sequence token stops generation). ``--config`` builds the model of a
config file with random weights (``--init-seed``; ``--config.a.b=value`` overrides) and
has no tokenizer: a ``--prompt`` is then encoded as its UTF-8 bytes (token ids 0..255,
so the vocabulary must hold at least 256 tokens) and the continuation is decoded the same
way, ids above 255 printed as ``<id>``. ``--prompt-ids`` gives token ids directly and
prints the new ids comma-separated.
"""

from __future__ import annotations

import functools

from kvshare_jax.commands import ArgParser, add_prefill_flags, error, prefill_from_flags

PROG = "kvshare generate"
BYTE_VOCAB = 256


def _parser() -> ArgParser:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="training workdir: newest checkpoint + its tokenizer")
    model.add_argument("--config", help="config file; random init (overrides: --config.a.b=v)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k best (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus probability (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--init-seed", type=int, default=None, help="init seed (default train.seed)")
    add_prefill_flags(p)
    return p


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


class _ByteTokenizer:
    """UTF-8 bytes as token ids: the fallback when the model has no tokenizer."""

    eos_id = -1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < BYTE_VOCAB:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace") + f"<{i}>")
            run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")


def _load_model(args, overrides: list[str]):
    """``(cfg, params or None, tokenizer or None, init seed)``; params None = random init."""
    if args.workdir:
        from kvshare_jax.checkpoint import open_model

        # token ids in and out need no tokenizer (its EOS still stops when it has one)
        need_tokenizer = args.prompt_ids is None
        cfg, params, tokenizer, _ = open_model(args.workdir, need_tokenizer=need_tokenizer)
        return cfg, params, tokenizer, None
    from kvshare_jax.config import load_config, model_config_from

    config = load_config(args.config, tuple(o.removeprefix("--") for o in overrides))
    seed = config.train.seed if args.init_seed is None else args.init_seed
    return model_config_from(config), None, None, seed


def run(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        return _error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
    if overrides and not args.config:
        return _error("--config.a.b=value overrides need --config")

    import jax
    import numpy as np

    from kvshare_jax.decode import check_request, generate
    from kvshare_jax.model import init_params
    from kvshare_jax.sampling import Sampling

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        prefill_settings = prefill_from_flags(args)
        cfg, params, tokenizer, init_seed = _load_model(args, overrides)
        if args.prompt_ids is not None:
            ids = _ints(args.prompt_ids, "--prompt-ids")
        else:
            if tokenizer is None:
                if cfg.vocab_size < BYTE_VOCAB:
                    raise ValueError(
                        f"text prompts without a tokenizer need a vocabulary of >= {BYTE_VOCAB} "
                        f"(UTF-8 bytes), the model has {cfg.vocab_size}: use --prompt-ids"
                    )
                tokenizer = _ByteTokenizer()
            if args.prompt_file is not None:
                with open(args.prompt_file, encoding="utf-8") as f:
                    text = f.read()
            else:
                text = args.prompt
            ids = tokenizer.encode(text)
            if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id >= 0:
                ids = [tokenizer.bos_id, *ids]  # imported models expect BOS first
        check_request(cfg, np.asarray([ids], np.int32), None, args.max_new_tokens)
        if params is None:
            params = init_params(cfg, jax.random.key(init_seed))
        eos = getattr(tokenizer, "eos_id", -1)
        out = generate(
            cfg,
            params,
            [ids],
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            rng=jax.random.key(args.seed),
            stop_tokens=(eos,) if 0 <= eos < cfg.vocab_size else (),
            prefill_settings=prefill_settings,
        )
    except (ValueError, OSError) as e:
        return _error(e)
    new = [int(t) for t in out.tokens[0, : int(out.lengths[0])]]
    if args.prompt_ids is not None:
        print(",".join(map(str, new)))
    else:
        print(tokenizer.decode([t for t in new if t != eos]))
    return 0
