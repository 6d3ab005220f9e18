"""The cached decoder: cache size and slot map, exactness against the sequential
reference for every layout with ragged prompts, prefill == parallel forward, sampling,
stop tokens, bad requests and the ``kvshare generate`` command."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinymodel import VOCAB
from tinymodel import small_config as tiny_config

from kvshare_jax.attention import INVALID_POS
from kvshare_jax.commands import generate as generate_cmd
from kvshare_jax.decode import (
    cache_bytes,
    cache_report,
    decode_step,
    generate,
    init_cache,
    prefill,
)
from kvshare_jax.layout import (
    PARTS,
    POSITIONS,
    STANDARD,
    from_spec,
    mapping_length,
    preset,
    preset_specs,
)
from kvshare_jax.model import ModelConfig, forward, init_params, sequential_logits
from kvshare_jax.prefill import Prefill
from kvshare_jax.sampling import Sampling, sample

L, KV = 6, 3
PRESET_SPECS = [s for s in preset_specs(KV) if s != STANDARD]
LAYOUT_SPECS = [*PRESET_SPECS, STANDARD, "yoco"]
PROMPT_WIDTH, LENGTHS, NEW = 6, (6, 2, 4), 5
# Converged prefill (passes >= prompt width); shared so tests reuse compiled programs.
EXACT = dict(max_new_tokens=NEW, prefill_settings=Prefill((PROMPT_WIDTH, 1)), return_logits=True)
TINY_CONFIG = "configs/tiny.py"
SAMPLING_SPEC = "0_2_2"  # 3 layers, one upward block: cheap programs for sampling tests


def small_config(spec: str, layers: int = L, **kw) -> ModelConfig:
    """The tiny model with a 24-token context and a window of 3."""
    return tiny_config(spec, layers, **{"max_len": 24, "sliding_window": 3, **kw})


@functools.cache
def model(spec: str) -> tuple[ModelConfig, dict]:
    cfg = small_config(spec, mapping_length(spec) or L)
    return cfg, init_params(cfg, jax.random.key(0))


def ragged_prompts(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts with distinct lengths; padding holds random junk."""
    b = len(LENGTHS)
    prompts = np.asarray(jax.random.randint(jax.random.key(seed), (b, PROMPT_WIDTH), 0, VOCAB))
    return prompts, np.asarray(LENGTHS)


def full_sequences(prompts: np.ndarray, lengths: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Each prompt followed by its generated tokens, right-padded with zeros."""
    out = np.zeros((len(lengths), PROMPT_WIDTH + new.shape[1]), np.int32)
    for i, n in enumerate(lengths):
        seq = np.concatenate([prompts[i, :n], new[i]])
        out[i, : len(seq)] = seq
    return out


def step_logits_of(reference: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    """The reference logits that predicted each generated token: ``[b, n, v]``."""
    return np.stack([reference[i, m - 1 : m - 1 + n] for i, m in enumerate(lengths)])


# ------------------------------------------------------------------ the cache
@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("position", POSITIONS)
def test_cache_bytes_are_exactly_kv_layers_over_layers(part, position):
    standard = small_config("standard")
    for num_kv in range(1, L + 1):
        cfg = dataclasses.replace(standard, layout=preset(part, position, L, num_kv))
        assert cache_bytes(cfg, 3, 10) * L == cache_bytes(standard, 3, 10) * num_kv
        cache = init_cache(cfg, 3, 10)
        assert len(cache.k) == len(cache.v) == num_kv
        assert sum(x.nbytes for x in (*cache.k, *cache.v)) == cache_bytes(cfg, 3, 10)


def test_slot_map_points_every_layer_at_its_target_slot():
    layout = from_spec("0_1_5_5_5_5", L)
    assert layout.kv_layers == (0, 1, 5)
    assert layout.slot_of_layer == (0, 1, 2, 2, 2, 2)
    report = cache_report(small_config("0_1_5_5_5_5"), 2, 10)
    assert "layer -> slot: 0 1 2 2 2 2" in report
    assert "3/6 of standard" in report and "ratio 0.5000" in report


# ------------------------------------------------------------------ exactness
# every sharing direction in the default run (standard, bottom, middle, top, yoco); the
# other five presets with -m slow
RAGGED_DEFAULT = {STANDARD, "yoco", "pizza-bottom:3", "sandwich-middle:3", "lasagna-top:3"}


@pytest.mark.parametrize(
    "spec",
    [s if s in RAGGED_DEFAULT else pytest.param(s, marks=pytest.mark.slow) for s in LAYOUT_SPECS],
)
def test_decoder_logits_equal_sequential_reference_with_ragged_prompts(spec):
    cfg, params = model(spec)
    prompts, lengths = ragged_prompts()
    out = generate(cfg, params, prompts, lengths, **EXACT)
    full = full_sequences(prompts, lengths, np.asarray(out.tokens))
    reference = np.asarray(sequential_logits(cfg, params, jnp.asarray(full)))
    np.testing.assert_allclose(
        np.asarray(out.logits), step_logits_of(reference, lengths, NEW), atol=1e-4, rtol=0
    )
    np.testing.assert_array_equal(out.tokens, np.argmax(out.logits, -1))
    np.testing.assert_array_equal(out.lengths, NEW)


@pytest.mark.parametrize("spec", ["pizza-top:3", "yoco"])
def test_converged_prefill_and_decode_equal_parallel_forward(spec):
    cfg, params = model(spec)
    prompts, lengths = ragged_prompts(seed=2)
    rows = np.arange(len(lengths))
    run_prefill = jax.jit(
        functools.partial(prefill, cfg, passes=(PROMPT_WIDTH - 1, 1), all_logits=True)
    )
    step = jax.jit(functools.partial(decode_step, cfg))
    cache = init_cache(cfg, len(lengths), PROMPT_WIDTH + NEW)
    prompt_logits, cache = run_prefill(params, cache, jnp.asarray(prompts), jnp.asarray(lengths))
    tok = jnp.argmax(prompt_logits[rows, lengths - 1], -1)
    fed, step_logits = [], []
    for _ in range(NEW):
        logits, cache = step(params, cache, tok)
        fed.append(tok)
        step_logits.append(logits)
        tok = jnp.argmax(logits, -1)
    step_logits = np.stack(step_logits, 1)
    full = full_sequences(prompts, lengths, np.stack(fed, 1))
    parallel = np.asarray(forward(cfg, params, jnp.asarray(full), passes=(full.shape[1], 1)))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(prompt_logits[i, :n], parallel[i, :n], atol=1e-4, rtol=0)
        np.testing.assert_allclose(step_logits[i], parallel[i, n : n + NEW], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.pos, lengths + NEW)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_both_slot_layouts_decode_alike(impl):
    """A cache laid out for TPU (HS slots, length rounded up to 128) and one for CPU (SH)
    give the same prompt and step logits, with ragged prompts and an upward layout; the
    write index and the per-index positions are the layout's only state."""
    cfg, params = model("lasagna-top:3")
    cfg = dataclasses.replace(cfg, attention_impl=impl)
    prompts, lengths = ragged_prompts(seed=4)
    b = len(lengths)
    got = {}
    for platform in ("cpu", "tpu"):
        cache = init_cache(cfg, b, PROMPT_WIDTH + NEW, platform=platform)
        logits, cache = prefill(cfg, params, cache, jnp.asarray(prompts), jnp.asarray(lengths))
        out = [logits]
        for _ in range(NEW):
            logits, cache = decode_step(cfg, params, cache, jnp.argmax(out[-1], -1))
            out.append(logits)
        got[platform] = (np.stack(out, 1), cache)
    (sh, cache_sh), (hs, cache_hs) = got["cpu"], got["tpu"]
    assert (cache_sh.layout, cache_hs.layout) == ("SH", "HS")
    assert cache_sh.length == PROMPT_WIDTH + NEW and cache_hs.length == 128
    assert cache_hs.k[0].shape == (b * cfg.num_kv_heads, cfg.hd, 128)
    np.testing.assert_allclose(hs, sh, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache_hs.kv_pos[:, : cache_sh.length], cache_sh.kv_pos)
    np.testing.assert_array_equal(cache_hs.kv_pos[:, cache_sh.length :], INVALID_POS)
    assert int(cache_hs.index) == int(cache_sh.index) == PROMPT_WIDTH + NEW


@pytest.mark.parametrize("passes", [(PROMPT_WIDTH, 1), "exact"])
def test_prefill_in_groups_of_prompts_equals_one_pass(passes):
    """``prefill(chunk=2)`` over 5 ragged prompts (groups 0-1, 2-3 and an overlapping last
    group 3-4) fills the same cache and logits as one pass over the batch."""
    cfg, params = model("sandwich-top:3")
    prompts = np.asarray(jax.random.randint(jax.random.key(5), (5, PROMPT_WIDTH), 0, VOCAB))
    lengths = jnp.asarray([6, 2, 4, 1, 5])
    outs = []
    for chunk in (None, 2):
        cache = init_cache(cfg, 5, PROMPT_WIDTH + NEW)
        outs.append(
            prefill(cfg, params, cache, jnp.asarray(prompts), lengths, passes=passes, chunk=chunk)
        )
    (want, ref), (got, cache) = outs
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip((*cache.k, *cache.v, cache.kv_pos), (*ref.k, *ref.v, ref.kv_pos), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_prompt_padding_is_never_attended():
    cfg, params = model("sandwich-top:3")
    prompts, lengths = ragged_prompts()
    other = prompts.copy()
    for i, n in enumerate(lengths):
        other[i, n:] = (other[i, n:] + 7) % VOCAB
    a = generate(cfg, params, prompts, lengths, **EXACT)
    b = generate(cfg, params, other, lengths, **EXACT)
    np.testing.assert_array_equal(a.logits, b.logits)


# ------------------------------------------------------------------ sampling
def test_greedy_is_deterministic():
    cfg, params = model("lasagna-middle:3")
    prompts, lengths = ragged_prompts()
    a = generate(cfg, params, prompts, lengths, rng=jax.random.key(1), **EXACT)
    b = generate(cfg, params, prompts, lengths, rng=jax.random.key(2), **EXACT)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_sampling_with_a_fixed_key_is_reproducible():
    cfg, params = model(SAMPLING_SPEC)
    prompts, lengths = ragged_prompts()
    hot = Sampling(temperature=5.0, top_p=0.95)
    runs = [
        generate(cfg, params, prompts, lengths, max_new_tokens=NEW, sampling=hot, rng=key)
        for key in (jax.random.key(3), jax.random.key(3), jax.random.key(4))
    ]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    assert not np.array_equal(runs[0].tokens, runs[2].tokens)


def test_top_k_1_equals_greedy():
    cfg, params = model(SAMPLING_SPEC)
    prompts, lengths = ragged_prompts()
    greedy = generate(cfg, params, prompts, lengths, **EXACT)
    top1 = generate(
        cfg,
        params,
        prompts,
        lengths,
        max_new_tokens=NEW,
        sampling=Sampling(temperature=2.0, top_k=1),
        rng=jax.random.key(5),
    )
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_top_k_and_top_p_sample_only_from_the_kept_candidates():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    settings = {
        Sampling(temperature=1.0): {0, 1, 2, 3},
        Sampling(temperature=1.0, top_k=2): {0, 1},
        Sampling(temperature=1.0, top_p=0.7): {0, 1},
        Sampling(temperature=1.0, top_p=0.45): {0},
        Sampling(temperature=1.0, top_k=3, top_p=0.9): {0, 1, 2},
    }

    @jax.jit
    def draws(keys):
        return [jax.vmap(lambda k, s=s: sample(logits, k, s))(keys) for s in settings]

    results = draws(jax.random.split(jax.random.key(0), 400))
    for kept, tokens in zip(settings.values(), results, strict=True):
        assert set(np.asarray(tokens).ravel().tolist()) == kept


def test_bad_sampling_settings_raise():
    for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**kw)


# ------------------------------------------------------------------ stop tokens
def test_stop_tokens_end_sequences_and_pad_the_rest():
    cfg, params = model(SAMPLING_SPEC)
    prompts, lengths = ragged_prompts()
    free = np.asarray(generate(cfg, params, prompts, lengths, **EXACT).tokens)
    stop, pad = int(free[0, 2]), VOCAB - 1
    out = generate(
        cfg, params, prompts, lengths, max_new_tokens=NEW, stop_tokens=(stop,), pad_id=pad
    )
    for i in range(len(lengths)):
        hits = np.flatnonzero(free[i] == stop)
        n = hits[0] + 1 if hits.size else NEW
        assert out.lengths[i] == n
        np.testing.assert_array_equal(out.tokens[i, :n], free[i, :n])
        assert (np.asarray(out.tokens[i, n:]) == pad).all()
    assert out.lengths[0] <= 3


# ------------------------------------------------------------------ bad requests
@pytest.mark.parametrize(
    "prompts, lengths, new, message",
    [
        ([[1, 2, 3]], [3], 22, "exceeds the model context"),
        ([[1, 2, 3]], [0], 4, "empty prompt"),
        (np.zeros((1, 0), np.int32), None, 4, "empty prompt"),
        ([[1, VOCAB, 3]], [3], 4, "out of the vocabulary"),
        ([[1, -1, 3]], [3], 4, "out of the vocabulary"),
        ([[1, 2, 3]], [3], 0, "max_new_tokens"),
    ],
)
def test_bad_requests_raise_clear_errors(prompts, lengths, new, message):
    cfg, params = model("standard")
    with pytest.raises(ValueError, match=message):
        generate(cfg, params, prompts, lengths, max_new_tokens=new)


def test_padding_may_hold_any_id():
    cfg, params = model("standard")
    zeros = generate(cfg, params, [[1, 2, 3], [4, 0, 0]], [3, 1], **EXACT)
    junk = generate(cfg, params, [[1, 2, 3], [4, -1, VOCAB]], [3, 1], **EXACT)
    np.testing.assert_array_equal(zeros.logits, junk.logits)
    assert np.isfinite(junk.logits).all()


# ------------------------------------------------------------------ CLI
def test_generate_cli_prints_a_continuation(capsys):
    argv = ["--config", TINY_CONFIG, "--config.model.layout=pizza-top:2", "--prompt", "hi"]
    argv += ["--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "5", "--seed", "1"]
    assert generate_cmd.run(argv) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out) > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-ids", "1,2", "--max-new-tokens", "255"], "exceeds the model context"),
        (["--prompt", "", "--max-new-tokens", "2"], "empty prompt"),
        (["--prompt-ids", "1,5000", "--max-new-tokens", "2"], "out of the vocabulary"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt.txt"),
    ],
)
def test_generate_cli_errors_are_one_line(capsys, argv, message):
    assert generate_cmd.run(["--config", TINY_CONFIG, *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_generate_cli_workdir_without_checkpoint_is_an_error(capsys, tmp_path):
    assert generate_cmd.run(["--workdir", str(tmp_path), "--prompt", "hi"]) != 0
    err = capsys.readouterr().err
    assert str(tmp_path) in err and len(err.strip().splitlines()) == 1
