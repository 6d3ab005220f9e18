"""``experiments/peer_throughput.py`` on a tiny random Llama: HF ``generate``, CTranslate2
and kvshare_jax emit the same greedy tokens (needs the [hf] and [peer] extras)."""

import importlib
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.hf
SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "peer_throughput.py"
SHAPE = dict(layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=512)


@pytest.fixture(scope="module")
def script():
    """The script imported by name (its worker processes import it the same way)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("peer_throughput")
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def peer(script):
    pytest.importorskip("ctranslate2")
    return script


def test_a_system_in_its_own_process_emits_the_same_tokens(script, tmp_path):
    hf_dir = script.build_hf(str(tmp_path / "hf_tiny"), **SHAPE)
    prompts = np.random.default_rng(1).integers(3, SHAPE["vocab"], (2, 5))
    local = script.make_runner("kvshare", hf_dir, str(tmp_path), 6, 1)(prompts)
    worker = script.ProcessRunner("kvshare", hf_dir, str(tmp_path), 6, 1)
    try:
        np.testing.assert_array_equal(worker(prompts), local)
        assert worker.process.pid != script.os.getpid()
    finally:
        worker.close()
    assert not worker.process.is_alive()
    with pytest.raises(RuntimeError, match="kvshare worker failed: .*"):
        script.ProcessRunner("kvshare", str(tmp_path / "missing"), str(tmp_path / "c"), 6, 1)


def test_three_systems_emit_the_same_greedy_tokens(peer, tmp_path):
    hf_dir = peer.build_hf(str(tmp_path / "hf"), **SHAPE)
    ct2_dir = peer.convert_ct2(hf_dir, str(tmp_path / "ct2"))
    gen_len = 12
    runners = {
        "hf": peer.hf_runner(hf_dir, gen_len, threads=1),
        "ct2": peer.ct2_runner(ct2_dir, gen_len, threads=1),
        "kvshare": peer.kvshare_runner(hf_dir, str(tmp_path / "kvshare"), gen_len),
    }
    prompts = np.random.default_rng(0).integers(3, SHAPE["vocab"], (3, 7))
    out = {name: run(prompts) for name, run in runners.items()}
    assert out["hf"].shape == (3, gen_len)
    assert len({tuple(map(tuple, o)) for o in out.values()}) == 1, out
    # the tokens depend on the prompt (a constant output would pass trivially)
    assert not np.array_equal(out["kvshare"][0], out["kvshare"][1])


def test_bench_reports_rows_and_markdown(peer):
    def constant(prompts):
        return np.zeros((prompts.shape[0], 4), np.int64)

    def shifted(prompts):
        return np.ones((prompts.shape[0], 4), np.int64)

    prompts = np.zeros((2, 3), np.int64)
    result = peer.bench({"ct2": constant, "kvshare": shifted}, prompts, [1, 2], 1, False)
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert not any(r["tokens_match"] for r in result["rows"])
    assert result["rows"][1]["token_agreement"] == {"kvshare": 0.0}
