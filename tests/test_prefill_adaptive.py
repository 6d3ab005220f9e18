"""Adaptive prefill of cyclic blocks: ``"exact"`` equals the sequential reference for
prompts longer than the fixed m + b = 9 passes, ``"auto"`` with tol 0 equals ``"exact"``,
the passes counted stay <= t, and the option parsing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinymodel import VOCAB
from tinymodel import small_config as tiny_config

from kvshare_jax.decode import generate, init_cache, prefill
from kvshare_jax.model import forward_hidden, init_params, sequential_logits
from kvshare_jax.prefill import DEFAULT_TOL, Prefill, check_tol, parse_passes

UPWARD = ["pizza-top:3", "sandwich-middle:3", "lasagna-top:3"]
WIDTH = 14  # longer than the config's fixed 7 + 2 passes


@functools.cache
def model(spec: str):
    cfg = tiny_config(spec, 6, max_len=32, init_std=0.3)  # strong coupling: slow convergence
    return cfg, init_params(cfg, jax.random.key(0))


@functools.cache
def prefill_fn(spec: str, passes, tol: float = 0.0):
    cfg, _ = model(spec)
    return jax.jit(
        functools.partial(prefill, cfg, passes=passes, tol=tol, all_logits=True, return_passes=True)
    )


def prompts(b: int = 2, seed: int = 3) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, WIDTH), 0, VOCAB)


def run_prefill(spec: str, passes, tol: float = 0.0):
    cfg, params = model(spec)
    tokens = prompts()
    lengths = jnp.full((tokens.shape[0],), WIDTH, jnp.int32)
    cache = init_cache(cfg, tokens.shape[0], WIDTH)
    logits, cache, ran = prefill_fn(spec, passes, tol)(params, cache, tokens, lengths)
    return np.asarray(logits), cache, int(ran)


@pytest.mark.parametrize(
    "spec", [UPWARD[0], *(pytest.param(s, marks=pytest.mark.slow) for s in UPWARD[1:])]
)
def test_exact_prefill_equals_sequential_reference(spec):
    cfg, params = model(spec)
    reference = np.asarray(sequential_logits(cfg, params, prompts()))
    logits, _, ran = run_prefill(spec, "exact")
    np.testing.assert_allclose(logits, reference, atol=2e-4, rtol=1e-4)
    assert 1 <= ran <= WIDTH
    # the fixed 7 + 2 passes are not exact on this strongly coupled model
    fixed, _, ran_fixed = run_prefill(spec, (7, 2))
    assert ran_fixed == 9
    assert np.abs(fixed - reference).max() > 1e-3


@pytest.mark.parametrize("spec", UPWARD[:2])
def test_auto_with_zero_tolerance_is_exact(spec):
    exact, cache_e, ran_e = run_prefill(spec, "exact")
    auto, cache_a, ran_a = run_prefill(spec, "auto", 0.0)
    np.testing.assert_array_equal(auto, exact)
    for a, e in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_e), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert ran_a == ran_e <= WIDTH


def test_auto_counts_passes_and_stops_on_tolerance():
    spec = UPWARD[0]
    cfg, _ = model(spec)
    _, _, floor = run_prefill(spec, "auto", 1e9)  # any change is below the tolerance
    # ... but auto never runs fewer than the config's fixed m + b passes
    assert floor == min(cfg.forward_passes + cfg.backward_passes, WIDTH)
    fixed, _, _ = run_prefill(spec, (cfg.forward_passes, cfg.backward_passes))
    at_floor, _, _ = run_prefill(spec, "auto", 1e9)
    np.testing.assert_allclose(at_floor, fixed, atol=1e-5)  # the fixed passes' result
    exact, _, ran_e = run_prefill(spec, "exact")
    loose, _, ran_l = run_prefill(spec, "auto", 1e-2)
    assert 1 <= ran_l <= ran_e <= WIDTH
    assert np.abs(loose - exact).max() < 1.0  # close, not necessarily equal


def test_layout_without_cyclic_block_runs_no_passes():
    cfg = tiny_config("standard", 2)
    params = init_params(cfg, jax.random.key(0))
    tokens = prompts(1)
    _, _, ran = forward_hidden(cfg, params, tokens, passes="exact", return_passes=True)
    assert int(ran) == 0


def test_generate_exact_prefill_matches_reference_greedy_tokens():
    spec = UPWARD[1]
    cfg, params = model(spec)
    tokens = np.asarray(prompts(1))
    out = generate(cfg, params, tokens, max_new_tokens=3, prefill_settings=Prefill("exact"))
    # greedy continuation from the sequential reference, one token at a time
    seq = tokens
    for _ in range(3):
        nxt = np.asarray(sequential_logits(cfg, params, jnp.asarray(seq)))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, WIDTH:])


@pytest.mark.parametrize(
    "text, expected", [("auto", "auto"), (" EXACT ", "exact"), ("3,2", (3, 2)), ((0, 1), (0, 1))]
)
def test_parse_passes_parses(text, expected):
    assert parse_passes(text) == expected


@pytest.mark.parametrize("bad", ["fast", "3", "3,0", (1,), "1,2,3"])
def test_parse_passes_refuses(bad):
    with pytest.raises(ValueError, match=r"prefill_passes \(m, b\) needs"):
        parse_passes(bad)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "x"])
def test_check_tol_refuses(bad):
    with pytest.raises(ValueError, match="prefill_tol must be a finite number >= 0"):
        check_tol(bad)


def test_prefill_settings_take_a_tolerance_only_with_auto():
    assert Prefill() == Prefill("auto", DEFAULT_TOL) == Prefill.parse(" AUTO ", "1e-4")
    assert Prefill.parse("3,2") == Prefill((3, 2)) and Prefill((3, 2)).tol is None
    assert Prefill("exact").iteration() == {"passes": "exact", "tol": 0.0}
    with pytest.raises(ValueError, match="prefill_tol needs prefill_passes=auto"):
        Prefill("exact", 1e-3)
    with pytest.raises(ValueError, match=r"^study.prefill_tol must be a finite number"):
        Prefill.parse(None, "x", ("study.prefill_passes", "study.prefill_tol"))


# ------------------------------------------------------------------ CLI
TINY_CONFIG = "configs/tiny.py"
CLI_BASE = ["--config", TINY_CONFIG, "--config.model.layout=pizza-top:2", "--prompt-ids"]


def test_generate_cli_prefill_modes_agree_at_tolerance_zero(capsys):
    from kvshare_jax.commands import generate as generate_cmd

    outputs = []
    for extra in (["exact"], ["auto", "--prefill-tol", "0"]):
        argv = [*CLI_BASE, "3,4,5,6,7,8,9,10,11,12,13,14", "--max-new-tokens", "4"]
        assert generate_cmd.run([*argv, "--prefill-passes", *extra]) == 0
        outputs.append(capsys.readouterr().out.strip())
    assert outputs[0] == outputs[1] and outputs[0].count(",") == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prefill-passes", "fast"], "--prefill-passes needs auto, exact or two numbers"),
        (["--prefill-passes", "exact", "--prefill-tol", "0.1"], "--prefill-tol needs"),
        (["--prefill-passes", "auto", "--prefill-tol", "-1"], "--prefill-tol must be"),
    ],
)
def test_generate_cli_refuses_bad_prefill_options(capsys, extra, message):
    from kvshare_jax.commands import generate as generate_cmd

    assert generate_cmd.run([*CLI_BASE, "3,4", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_eval_prefill_passes_set_the_forward_passes():
    import ml_collections

    from kvshare_jax.commands.eval import _set_passes

    config = ml_collections.ConfigDict({"train": {"seq_len": 64}, "model": {}})
    _set_passes(config, "exact")
    assert (config.model.forward_passes, config.model.backward_passes) == (63, 1)
    _set_passes(config, "3,2")
    assert (config.model.forward_passes, config.model.backward_passes) == (3, 2)
    with pytest.raises(ValueError, match="auto needs the decoder"):
        _set_passes(config, "auto")
