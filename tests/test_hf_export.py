"""``kvshare convert --to-hf`` exports that load in transformers: shared-KV layouts ship a
PyTorch modeling file (``auto_map``, ``trust_remote_code=True``) whose logits match
kvshare_jax within 1e-4 (fp32) and whose greedy ``generate`` (cache of the KV layers
only) emits kvshare_jax's tokens; the standard layout stays a plain ``llama``."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

from kvshare_jax import cli, convert, hf_export  # noqa: E402
from kvshare_jax.decode import generate  # noqa: E402
from kvshare_jax.model import ModelConfig, forward, init_params  # noqa: E402

pytestmark = pytest.mark.hf

VOCAB, M, B = 97, 3, 2  # prompts of <= M + B tokens prefill exactly

LAYOUTS = [
    ("standard", "0_1_2_3"),
    ("cla:2", "0_0_2_2"),  # downward
    ("sandwich-middle:3", "0_1_1_3"),  # downward, middle target
    ("lckv:1", "0_3_3_3"),  # upward: one cyclic block over layers 1..3
    ("sandwich-top:3", "0_2_2_3"),  # upward, a block in the middle
    ("yoco", "0s_1s_2_2"),  # sliding-window layers
]


def export(spec: str, tmp_path) -> tuple[ModelConfig, dict, str]:
    """A random tiny model in layout ``spec`` (GQA 4/2, window 3) exported to HF."""
    cfg = ModelConfig.create(
        spec,
        4,
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        d_ff=64,
        max_len=64,
        forward_passes=M,
        backward_passes=B,
        sliding_window=3,
        init_std=0.3,  # peaked logits: greedy choices are not near-ties
    )
    params = init_params(cfg, jax.random.key(1))
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "hf")
    convert.save_workdir(workdir, cfg, params)
    assert cli.main(["convert", "--to-hf", out, "--workdir", workdir]) == 0
    return cfg, params, out


def load(out: str):
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


@pytest.mark.parametrize("spec,mapping", LAYOUTS, ids=[s for s, _ in LAYOUTS])
def test_exported_logits_and_greedy_tokens_match_kvshare(spec, mapping, tmp_path):
    cfg, params, out = export(spec, tmp_path)
    assert str(cfg.layout) == mapping
    hf = json.loads(open(os.path.join(out, "config.json")).read())
    shipped = {n for n in hf_export.FILES if os.path.exists(os.path.join(out, n))}
    if spec == "standard":
        assert hf["model_type"] == "llama" and "auto_map" not in hf and not shipped
    else:
        assert hf["model_type"] == "lckv-llama" and hf["auto_map"] == hf_export.AUTO_MAP
        assert shipped == set(hf_export.FILES)
    model = load(out)

    toks = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    ours = np.asarray(forward(cfg, params, jnp.asarray(toks, jnp.int32)))
    with torch.no_grad():
        theirs = model(torch.as_tensor(toks)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    prompt = toks[:, : M + B]
    want = np.asarray(generate(cfg, params, prompt, max_new_tokens=10).tokens)
    with torch.no_grad():
        got = model.generate(
            torch.as_tensor(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    np.testing.assert_array_equal(got[:, M + B :].numpy(), want)


def test_cache_holds_kv_layers_only_and_decoding_is_sequential(tmp_path):
    """Step-by-step decoding with the cache equals the parallel forward run with as many
    iterations as tokens (exact sequential semantics), for an upward layout."""
    from kvshare_jax.model import sequential_logits

    cfg, params, out = export("lckv:1", tmp_path)
    model = load(out)
    toks = np.random.default_rng(2).integers(0, VOCAB, (1, 9))
    with torch.no_grad():
        first = model(torch.as_tensor(toks[:, :4]), use_cache=True)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        steps = [first.logits]
        for p in range(4, toks.shape[1]):
            step = model(torch.as_tensor(toks[:, p : p + 1]), use_cache=True, cache=cache)
            steps.append(step.logits)
    assert sorted(cache.k) == list(cfg.layout.kv_layers) == [0, 3]
    got = torch.cat(steps, dim=1).numpy()
    want = np.asarray(sequential_logits(cfg, params, jnp.asarray(toks, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
