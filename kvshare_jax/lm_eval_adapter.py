"""lm-eval-harness adapter (the ``[eval]`` extra): a workdir as an ``lm_eval`` model.

Shapes: b batch, t time, v vocabulary. Requests are sorted by length, batched (the batch
padded to ``batch_size`` rows, time right-padded to a power-of-two bucket so few shapes
are compiled) and scored with the parallel ``forward``; right padding never changes the
logits of real tokens (attention is causal). Inputs longer than the model's
``max_len`` keep their last ``max_len`` tokens; ``loglikelihood_rolling`` scores long
texts in lm-eval's rolling windows of ``max_len`` tokens. Generation is greedy, with
the cached decoder (``decode.generate``). Layouts with cyclic blocks are scored as
trained (the config's ``m + b`` iterations), as the reference implementation does.

Registered as ``kvshare``: ``simple_evaluate(model="kvshare",
model_args="workdir=DIR,tokenizer=PATH,batch_size=8")`` works once this module is imported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from kvshare_jax import progress
from kvshare_jax.decode import generate
from kvshare_jax.model import ModelConfig, Params, forward

MIN_BUCKET = 16


class TextTokenizer(Protocol):
    """What the adapter needs of a tokenizer (``data.tokenizer.Tokenizer`` and
    ``JsonTokenizer`` fit); an ``add_bos`` attribute, when true, prepends BOS."""

    eos_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A HuggingFace tokenizer (``AutoTokenizer`` dir) behind the ``TextTokenizer`` API;
    ``add_bos`` records whether it prepends BOS by default (Llama tokenizers do)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        with_special = self._tok.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str) -> TextTokenizer:
    """A SentencePiece ``.model`` file, a HuggingFace ``tokenizer.json``, or a directory
    holding one of them (read without transformers); any other directory goes through
    transformers' ``AutoTokenizer``."""
    from kvshare_jax.data.tokenizer import TOKENIZER_FILES
    from kvshare_jax.data.tokenizer import load_tokenizer as load_file

    if os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES
    ):
        return HFTokenizer(path)
    return load_file(path)


def _bucket(n: int, cap: int) -> int:
    """The next power of two ``>= n`` (at least ``MIN_BUCKET``), capped at ``cap``."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def _score(
    cfg: ModelConfig, params: Params, inputs: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``inputs, targets [b,t]`` -> per-token log-prob of the target and whether it is
    the argmax, both ``[b,t]``."""
    logits = forward(cfg, params, inputs)  # [b, t, v] fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("kvshare")
class KVShareLM(TemplateLM):
    """Scores and generates with a kvshare model and a ``TextTokenizer``."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        tokenizer: TextTokenizer,
        batch_size: int = 8,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = bool(getattr(tokenizer, "add_bos", False))

    @classmethod
    def from_workdir(
        cls, workdir: str, tokenizer: str = "", batch_size: int = 8, max_gen_toks: int = 256
    ) -> KVShareLM:
        """Loads the newest checkpoint of ``workdir`` (or a HF model dir) and a tokenizer:
        ``tokenizer`` (SentencePiece file, ``tokenizer.json`` or HF dir), else the
        workdir's ``tokenizer.model`` or ``tokenizer.json``."""
        from kvshare_jax.checkpoint import open_model, tokenizer_file

        cfg, params, _, _ = open_model(workdir)
        tokenizer = tokenizer or str(tokenizer_file(workdir))
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(
                f"{workdir} has no tokenizer ({tokenizer}): pass --tokenizer (a SentencePiece "
                ".model file, a tokenizer.json or a HuggingFace tokenizer dir)"
            )
        return cls(cfg, params, load_tokenizer(tokenizer), batch_size, max_gen_toks)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> KVShareLM:
        """``{"workdir": DIR, "tokenizer": PATH, "batch_size": B, "max_gen_toks": N}``
        (only ``workdir`` required; lm-eval's ``batch_size`` applies when not given)."""
        args = dict(arg_dict)
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size is not None:
            args.setdefault("batch_size", int(batch_size))
        return cls.from_workdir(**args)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> KVShareLM:
        """``"workdir=DIR,tokenizer=PATH,batch_size=B,max_gen_toks=N"`` (lm-eval API)."""
        return cls.create_from_arg_obj(
            utils.simple_parse_args_string(arg_string), additional_config
        )

    # ------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.add_bos else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        ids = self.tok.encode(string)
        if self.add_bos and add_special_tokens is not False:
            ids = [self.tok.bos_id, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    # ----------------------------------------------------------- batching
    def _batches(self, lengths: list[int]) -> Iterator[tuple[list[int], int]]:
        """Indices of length-sorted batches (longest first) and their padded width."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, _bucket(lengths[idx[0]], self.max_length)

    def _pad(self, rows: list[list[int]], width: int) -> np.ndarray:
        """``[batch_size, width]`` int32, rows right-padded with 0 (extra rows all 0)."""
        out = np.zeros((self.batch_size, width), np.int32)
        for r, row in enumerate(rows):
            out[r, : len(row)] = row
        return out

    def _progress(self, count: int, desc: str, disable: bool) -> progress.Progress:
        """A bar over the batches of ``count`` requests."""
        batches = -(-count // self.batch_size)
        return progress.bar(total=batches, desc=desc, unit="batch", disable=disable)

    def _score_pairs(
        self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is greedy)`` per token pair,
        keeping the last ``max_len + 1`` tokens of ``context + continuation``; a bar
        (``desc``) over the batches unless ``disable_tqdm``."""
        seqs = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in pairs]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        with self._progress(len(seqs), desc, disable_tqdm) as bar:
            for idx, width in self._batches([len(s) - 1 for s in seqs]):
                inputs = self._pad([seqs[i][:-1] for i in idx], width)
                targets = self._pad([seqs[i][1:] for i in idx], width)
                logp, greedy = jax.device_get(_score(self.cfg, self.params, inputs, targets))
                for r, i in enumerate(idx):
                    end = len(seqs[i]) - 1
                    start = end - min(len(pairs[i][1]), end)
                    out[i] = (float(logp[r, start:end].sum()), bool(greedy[r, start:end].all()))
                bar.update(1)
        return out

    def _generate(self, specs: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Greedy continuations of one batch of ``(prompt, stop strings, max new tokens)``
        with the cached decoder; a row ends at EOS or its budget, and its text is cut
        before the first stop string."""
        budget = max(n for _, _, n in specs)
        rows = [p[-(self.max_length - budget) :] for p, _, _ in specs]  # room for the budget
        width = min(_bucket(max(map(len, rows)), self.max_length), self.max_length - budget)
        # one filler row of the full width pins the prompt width that `generate` compiles
        # for (it trims prompts to the longest), so few shapes are compiled
        rows.append([0] * width)
        prompts = np.zeros((self.batch_size + 1, width), np.int32)
        lengths = np.ones(self.batch_size + 1, np.int32)
        for r, row in enumerate(rows):
            prompts[r, : len(row)], lengths[r] = row, len(row)
        out = generate(
            self.cfg,
            self.params,
            prompts,
            lengths,
            max_new_tokens=budget,
            stop_tokens=(self.tok.eos_id,),
        )
        tokens, counts = jax.device_get((out.tokens, out.lengths))
        texts = []
        for r, (_, until, limit) in enumerate(specs):
            ids = [int(t) for t in tokens[r, : min(counts[r], limit)] if t != self.tok.eos_id]
            text = self.tok.decode(ids)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts

    # ------------------------------------------------------------ lm-eval API
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_,
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score_pairs(pairs, "loglikelihood", disable_tqdm)
        for (key, _, _), res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Sum of token log-probs of each text, in rolling windows of ``max_len``."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            toks = self.tok_encode(req.args[0], add_special_tokens=False)
            rolling = utils.get_rolling_token_windows(
                toks, self.prefix_token_id, self.max_length, 1
            )
            for window in map(utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(k)
        totals = [0.0] * len(requests)
        scores = self._score_pairs(windows, "loglikelihood_rolling", disable_tqdm)
        for k, (logp, _) in zip(owner, scores, strict=True):
            totals[k] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (sampling arguments are ignored) until ``until`` strings,
        EOS or ``max_gen_toks`` (``decode.generate``: prefill, then cached steps); prompts
        keep their last ``max_len - max_gen_toks`` tokens."""
        specs = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            specs.append((prompt, until, min(max(limit, 1), self.max_length - 1)))
        out = [""] * len(specs)
        with self._progress(len(specs), "generate_until", disable_tqdm) as bar:
            for idx, _ in self._batches([len(p) for p, _, _ in specs]):
                for i, text in zip(idx, self._generate([specs[i] for i in idx]), strict=True):
                    out[i] = text
                bar.update(1)
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
