"""The generation benchmark: byte sizes, the max-batch search against the compiled
program's memory, and a ``kvshare bench`` smoke run writing JSON, markdown and a plot."""

import functools
import json

import jax
import pytest
from tinymodel import small_config

from kvshare_jax import bench
from kvshare_jax.commands import bench as bench_cmd
from kvshare_jax.decode import cache_bytes
from kvshare_jax.layout import preset_specs
from kvshare_jax.model import ModelConfig, init_params

PROMPT, GEN = 4, 4


def config(spec: str) -> ModelConfig:
    return small_config(spec, 2, vocab_size=64, d_model=32, num_heads=2, d_ff=64, max_len=16)


def test_parse_bytes():
    assert bench.parse_bytes("2GiB") == 2 * 2**30
    assert bench.parse_bytes("512 MiB") == 512 * 2**20
    assert bench.parse_bytes("1.5GB") == 1_500_000_000
    assert bench.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="byte size"):
        bench.parse_bytes("2 parsecs")


def test_preset_specs_are_standard_and_the_nine_presets():
    layouts = preset_specs(4)
    assert layouts[0] == "standard" and len(layouts) == 10
    assert {"pizza-bottom:4", "sandwich-middle:4", "lasagna-top:4"} <= set(layouts)


def test_program_memory_holds_params_and_cache():
    cfg = config("standard")
    mem = bench.program_memory(cfg, 3, PROMPT, GEN)
    params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    cache = cache_bytes(cfg, 3, PROMPT + GEN - 1)
    assert mem["total_bytes"] >= param_bytes + cache
    assert mem["alias_bytes"] >= cache  # the donated cache is updated in place


def test_max_batch_is_the_largest_batch_that_fits():
    cfg = config("standard")
    one = bench.program_memory(cfg, 1, PROMPT, GEN)["total_bytes"]
    two = bench.program_memory(cfg, 2, PROMPT, GEN)["total_bytes"]
    budget = one + 5 * (two - one) + (two - one) // 2
    batch, mem = bench.max_batch(cfg, budget, PROMPT, GEN)
    assert batch >= 2 and mem["total_bytes"] <= budget
    assert bench.program_memory(cfg, batch + 1, PROMPT, GEN)["total_bytes"] > budget
    assert bench.max_batch(cfg, one - 1, PROMPT, GEN) == (0, None)


@pytest.mark.parametrize("answer", [1, 7, 854, 855, 856, 858, 900])
def test_bracket_is_exact_and_searches_inside_the_known_bounds(answer):
    """The search's last step on its own, where ``answer`` is the largest batch that
    fits: exact from a guess below, inside or above the batches compiled before (855 and
    859, as an earlier secant step left them), and when those bracket the answer it
    compiles only batches between them."""
    for guess in (3, 857, 2000):
        known = {855: 855 <= answer, 859: 859 <= answer}
        compiled = []

        def fits(b, known=known, compiled=compiled):
            if b not in known:
                compiled.append(b)
                known[b] = b <= answer
            return known[b]

        assert bench._bracket(fits, known, guess, 1 << 16)[0] == answer, (guess, compiled)
        if 855 <= answer < 859:
            assert all(855 < b < 859 for b in compiled), (guess, compiled)


def test_bench_command_writes_json_markdown_and_plot(tmp_path, capsys):
    argv = [
        "--config",
        "configs/tiny.py",
        "--config.model.num_layers=2",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.data.vocab_size=64",
        "--layouts",
        "pizza-bottom:1",
        "--batch-sizes",
        "2",
        "--prompt-len",
        str(PROMPT),
        "--gen-len",
        str(GEN),
        "--memory-budget",
        "256KiB",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "smoke",
        "--quiet",
    ]
    assert bench_cmd.run(argv) == 0
    results = json.loads((tmp_path / "smoke.json").read_text())
    meta = results["meta"]
    assert meta["platform"] == "cpu" and meta["dtype"] == "float32" and meta["jax_version"]
    (row,) = results["rows"]
    assert row["layout"] == "pizza-bottom:1" and row["mapping"] == "0_0" and row["kv_layers"] == 1
    run = row["runs"][0]
    assert run["batch"] == 2 and run["e2e_tok_s"] > 0 and run["prefill_s"] > 0
    assert 0 < run["roofline_fraction"] and run["memory"]["total_bytes"] > 0
    assert row["max_batch"] > 0 and row["max_batch_memory"]["total_bytes"] <= 256 * 2**10
    assert row["max_batch_run"]["e2e_tok_s"] > 0
    assert "| pizza-bottom:1 |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_bench_command_rejects_bad_flags(capsys):
    assert bench_cmd.run(["--config", "configs/tiny.py", "--memory-budget", "lots"]) != 0
    assert "byte size" in capsys.readouterr().err
    assert bench_cmd.run(["--config", "configs/tiny.py", "--layouts", "nonsense"]) != 0
    assert "unknown layout" in capsys.readouterr().err
