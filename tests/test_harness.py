"""lm-eval adapter: loglikelihoods (batched, padded, truncated) equal summed token
log-probs of our forward pass, rolling and greedy generation agree with direct
computations, and ``kvshare harness`` scores a local multiple-choice task (no hub)."""

import functools
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from kvshare_jax import cli, convert  # noqa: E402
from kvshare_jax.data.tokenizer import train_tokenizer  # noqa: E402
from kvshare_jax.decode import generate  # noqa: E402
from kvshare_jax.lm_eval_adapter import KVShareLM  # noqa: E402
from kvshare_jax.model import ModelConfig, forward, init_params  # noqa: E402

pytestmark = pytest.mark.hf

MAX_LEN = 64
TASK_DATA = "examples/lm_eval_tasks/kvshare_tiny_mc.jsonl"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Rome is in Italy. The dog ran to the park and the cat slept.",
]
QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Rome"], 0),
    ("A cat sat on the", ["mat", "dog", "park"], 0),
    ("The quick brown", ["fox", "cat", "capital"], 0),
    ("Berlin is the capital of", ["Italy", "Germany", "France"], 1),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random-init model with a cyclic block (layout 0_2_2) and a SentencePiece
    tokenizer, written with ``convert.save_workdir``."""
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer(TEXTS * 3, 300)
    tok.save(root / "sp.model")
    cfg = ModelConfig.create(
        "0_2_2",
        vocab_size=tok.vocab_size,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        d_ff=128,
        max_len=MAX_LEN,
        forward_passes=2,
        init_std=0.2,  # peaked logits: greedy choices are not near-ties
    )
    params = init_params(cfg, jax.random.key(0))
    path = str(root / "wd")
    convert.save_workdir(path, cfg, params, str(root / "sp.model"))
    return path


@pytest.fixture(scope="module")
def lm(workdir):
    return KVShareLM.from_workdir(workdir, batch_size=3, max_gen_toks=8)


@functools.cache
def log_softmax_fn(cfg: ModelConfig):
    return jax.jit(lambda params, x: jax.nn.log_softmax(forward(cfg, params, x), axis=-1))


def reference(lm: KVShareLM, seq: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(seq[k+1] | seq[:k+1]), argmax token)`` for every k: ``[len-1]`` each,
    from one unbatched row (right-padded to ``MAX_LEN``: one compilation)."""
    n = len(seq) - 1
    x = np.zeros((1, MAX_LEN), np.int32)
    x[0, :n] = seq[:-1]
    logp = np.asarray(log_softmax_fn(lm.cfg)(lm.params, x))[0, :n]
    return logp[np.arange(n), seq[1:]], logp.argmax(-1)


def request(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_equals_summed_forward_logprobs(lm):
    long_context = " ".join(TEXTS)  # longer than max_len: keeps the last max_len + 1 tokens
    pairs = [(q, " " + c) for q, choices, _ in QUESTIONS for c in choices]
    pairs.append((long_context, " Paris"))
    results = lm.loglikelihood([request("loglikelihood", p, i) for i, p in enumerate(pairs)])
    tok = lm.tok
    assert len(tok.encode(long_context)) > MAX_LEN
    for (context, continuation), (logp, greedy) in zip(pairs, results, strict=True):
        ctx = tok.encode(context)
        whole = tok.encode(context + continuation)
        n = len(whole) - len(ctx)
        seq = whole[-(MAX_LEN + 1) :]
        per_token, argmax = reference(lm, seq)
        np.testing.assert_allclose(logp, per_token[-n:].sum(), atol=1e-4, rtol=1e-5)
        assert greedy == bool(np.all(argmax[-n:] == seq[-n:]))


def test_loglikelihood_rolling_scores_every_token_once(lm):
    short, long = TEXTS[1], " ".join(TEXTS * 2)
    got_short, got_long = lm.loglikelihood_rolling(
        [request("loglikelihood_rolling", (short,)), request("loglikelihood_rolling", (long,))]
    )
    ids = lm.tok.encode(short)
    assert len(ids) <= MAX_LEN
    want = reference(lm, [lm.tok.eos_id, *ids])[0].sum()
    np.testing.assert_allclose(got_short, want, atol=1e-4, rtol=1e-5)
    # a long text: windows of max_len, the first conditioned on EOS, each token once
    ids = lm.tok.encode(long)
    assert len(ids) > 3 * MAX_LEN
    first = reference(lm, [lm.tok.eos_id, *ids[:MAX_LEN]])[0].sum()
    rest, end = 0.0, MAX_LEN
    while end < len(ids):
        new_end = min(end + MAX_LEN, len(ids))
        window = ids[new_end - MAX_LEN - 1 : new_end]
        rest += reference(lm, window)[0][-(new_end - end) :].sum()
        end = new_end
    np.testing.assert_allclose(got_long, first + rest, atol=1e-3, rtol=1e-5)


def test_generate_until_matches_the_decoder_on_plain_prompts(lm):
    """Requests (bucketed, padded, with a filler row) give what ``decode.generate``
    gives the bare prompts, cut before the stop string and at EOS."""
    prompts = ["A cat", "Rome is in Italy. The dog ran to"]
    reqs = [
        request("generate_until", (p, {"until": ["."], "max_gen_toks": 8}), i)
        for i, p in enumerate(prompts)
    ]
    got = lm.generate_until(reqs)
    ids = [lm.tok.encode(p) for p in prompts]
    padded = np.zeros((2, max(map(len, ids))), np.int32)
    for r, row in enumerate(ids):
        padded[r, : len(row)] = row
    out = generate(
        lm.cfg,
        lm.params,
        padded,
        [len(r) for r in ids],
        max_new_tokens=8,
        stop_tokens=[lm.tok.eos_id],
    )
    for r, text in enumerate(got):
        new = [int(t) for t in out.tokens[r, : int(out.lengths[r])] if t != lm.tok.eos_id]
        assert text == lm.tok.decode(new).split(".")[0]
    assert any(got)  # not all empty: the comparison is not vacuous


def test_hf_tokenizer_dir_prepends_bos_like_transformers(workdir, tmp_path):
    """A local HuggingFace tokenizer dir (``--tokenizer DIR``) that adds BOS by default:
    contexts start with BOS and the score is that of ``[BOS] + context + continuation``."""
    pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 3, vocab_size=300, special_tokens=["<s>", "</s>"])
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(tmp_path / "tok")
    lm = KVShareLM.from_workdir(workdir, tokenizer=str(tmp_path / "tok"), batch_size=2)
    assert lm.add_bos and lm.prefix_token_id == bos
    ((logp, _),) = lm.loglikelihood([request("loglikelihood", ("Paris is the", " capital"))])
    whole = fast.encode("Paris is the capital")  # [BOS, ...] from transformers itself
    assert whole[0] == bos
    n = len(whole) - len(fast.encode("Paris is the"))
    np.testing.assert_allclose(logp, reference(lm, whole)[0][-n:].sum(), atol=1e-4, rtol=1e-5)


def test_registered_for_lm_eval_model_args(workdir):
    from lm_eval.api.registry import get_model

    assert get_model("kvshare") is KVShareLM
    lm = KVShareLM.create_from_arg_string(f"workdir={workdir},max_gen_toks=4", {"batch_size": 2})
    assert (lm.batch_size, lm.max_gen_toks, lm.max_length) == (2, 4, MAX_LEN)


def test_harness_cli_scores_local_multiple_choice_task(lm, workdir, tmp_path, capsys):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "results.json"
    args = ["--workdir", workdir, "--tasks", "tiny_mc", "--include-path", str(tasks)]
    assert cli.main(["harness", *args, "--batch-size", "4", "--output", str(out)]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    acc = json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"]
    # the same choice rule on the adapter's own loglikelihoods
    correct = 0
    for q, choices, answer in QUESTIONS:
        scores = lm.loglikelihood([request("loglikelihood", (q, " " + c)) for c in choices])
        correct += int(np.argmax([s for s, _ in scores]) == answer)
    assert acc == pytest.approx(correct / len(QUESTIONS))


def test_harness_cli_errors_are_one_line(workdir, tmp_path, capsys):
    bare = tmp_path / "bare"
    cfg = ModelConfig.create("0_1", vocab_size=16, d_model=8, num_heads=2, num_kv_heads=2, d_ff=8)
    convert.save_workdir(str(bare), cfg, init_params(cfg, jax.random.key(0)))
    cases = [
        (["--workdir", str(bare), "--tasks", "x"], "pass --tokenizer"),
        (["--workdir", workdir, "--tasks", "x", "--include-path", str(tmp_path / "no")], "not a"),
    ]
    for args, message in cases:
        assert cli.main(["harness", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvshare harness: error: ") and message in err
        assert err.count("\n") == 1


def test_readme_example_task_runs_on_a_tokenizer_json_workdir(tmp_path, monkeypatch, capsys):
    """The shipped ``examples/lm_eval_tasks`` task, as the README runs it (from the repo
    root), on a workdir whose tokenizer is a HuggingFace ``tokenizer.json``; accuracy
    equals the choice rule applied to the adapter's own loglikelihoods."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    items = [json.loads(line) for line in open(os.path.join(root, TASK_DATA))]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [" ".join([d["question"], *d["choices"]]) for d in items]
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["</s>", "<unk>"]))
    cfg = ModelConfig.create(
        "0_2_2", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32
    )
    path = str(tmp_path / "wd")
    convert.save_workdir(path, cfg, init_params(cfg, jax.random.key(3)))
    tok.save(os.path.join(path, "tokenizer.json"))
    lm = KVShareLM.from_workdir(path, batch_size=4)
    assert lm.tok.eos_id == 0 and lm.tok.encode("Rome is in") != []

    monkeypatch.chdir(root)
    out = tmp_path / "results.json"
    args = ["--workdir", path, "--tasks", "kvshare_tiny_mc"]
    args += ["--include-path", "examples/lm_eval_tasks", "--limit", "8", "--batch-size", "4"]
    assert cli.main(["harness", *args, "--output", str(out)]) == 0
    assert "kvshare_tiny_mc" in capsys.readouterr().out
    acc = json.loads(out.read_text())["results"]["kvshare_tiny_mc"]["acc,none"]
    correct = 0
    for d in items:
        reqs = [request("loglikelihood", (d["question"], " " + c)) for c in d["choices"]]
        scores = [s for s, _ in lm.loglikelihood(reqs)]
        correct += int(np.argmax(scores) == d["answer"])
    assert len(items) == 8 and acc == pytest.approx(correct / len(items))
