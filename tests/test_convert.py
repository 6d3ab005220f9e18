"""HuggingFace interop: Llama / lckv-llama import (logits and greedy tokens match
transformers), KV-weight placement, layout conversion (copy / average), export round
trips, and the CLI's one-line errors. Models are random-init and built locally."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kvshare_jax import checkpoint, cli, convert
from kvshare_jax.data.tokenizer import train_tokenizer
from kvshare_jax.decode import generate
from kvshare_jax.model import forward

L, VOCAB, T = 4, 256, 24


# ------------------------------------------------------------------ fixtures
def save_hf_llama(path, vocab: int = VOCAB):
    """A random-init fp32 ``LlamaForCausalLM`` (L=4, d=64, GQA 4/2) saved with
    ``save_pretrained`` at ``path``; norm scales randomised so a swapped norm would show."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """``(model, dir)`` of `save_hf_llama`."""
    path = tmp_path_factory.mktemp("hf") / "llama"
    return save_hf_llama(path), str(path)


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
    """The workdir made by ``kvshare convert --from-hf`` from ``hf_llama``."""
    workdir = str(tmp_path_factory.mktemp("wd") / "llama")
    assert cli.main(["convert", "--from-hf", hf_llama[1], "--workdir", workdir]) == 0
    return workdir


def hf_weight(model, name: str) -> np.ndarray:
    return model.state_dict()[name].detach().float().numpy()


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


def random_tokens(seed: int = 0, batch: int = 3, length: int = T) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int64)


def saved_names(hf_dir: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="np") as f:
        return set(f.keys())


def convert_cli(*args: str) -> int:
    return cli.main(["convert", *args])


# ----------------------------------------------------------------- llama import
@pytest.mark.hf
def test_llama_import_logits_match_transformers(hf_llama, imported):
    model, _ = hf_llama
    cfg, params, _, _ = checkpoint.open_model(imported)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (4, 64, 4, 2)
    assert (cfg.d_ff, cfg.max_len, cfg.rope_theta, cfg.norm_eps) == (128, 128, 5000.0, 1e-5)
    toks = random_tokens()
    ref = hf_logits(model, toks)
    assert ref.std() > 0.1  # logits large enough for the tolerance to mean something
    ours = jax.jit(forward, static_argnums=0)(cfg, params, jnp.asarray(toks, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.hf
def test_greedy_generation_matches_transformers(hf_llama, imported):
    """``decode.generate`` (prefill + cached steps) emits transformers' greedy tokens."""
    import torch

    model, _ = hf_llama
    cfg, params, _, _ = checkpoint.open_model(imported)
    prompt = random_tokens(seed=1, batch=2, length=6)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0
        ).numpy()
    out = generate(cfg, params, prompt.astype(np.int32), max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, 6:])


@pytest.mark.hf
def test_pytorch_bin_fp16_import_casts_to_fp32(hf_llama, tmp_path):
    import torch

    model, _ = hf_llama
    src = tmp_path / "bin"
    src.mkdir()
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    cfg, params, _, _ = checkpoint.open_model(str(src))
    kernel = params["params"]["layer_2"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.float32
    want = state["model.layers.2.self_attn.q_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), want)


@pytest.mark.hf
def test_tied_embeddings_and_wide_heads_round_trip(tmp_path):
    """``tie_word_embeddings`` and ``head_dim != hidden / heads`` (MQA): import matches
    transformers' logits, export has no ``lm_head`` and loads back with the same logits;
    a SentencePiece ``tokenizer.model`` travels both ways with its special ids."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(["the cat sat on the mat, the dog ran to the park"] * 4, 300)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tied")
    tok.save(tmp_path / "tied" / "tokenizer.model")
    cfg, params, _, _ = checkpoint.open_model(str(tmp_path / "tied"))
    assert cfg.tie_embeddings and cfg.hd == 16 and "lm_head" not in params["params"]
    toks = random_tokens(seed=4, batch=2, length=12)
    ours = np.asarray(forward(cfg, params, jnp.asarray(toks, jnp.int32)))
    np.testing.assert_allclose(ours, hf_logits(model, toks), atol=1e-4, rtol=0)
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "export")
    convert.import_hf(str(tmp_path / "tied"), workdir)
    hf = convert.export_hf(workdir, out)
    assert "lm_head.weight" not in saved_names(out)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (2, 1, 0)
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == tok.model_proto
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, toks), ours, atol=1e-4, rtol=0)


# ----------------------------------------------------------------- lckv import
def write_lckv(model, path, layer_types: str, sharded: bool = True) -> dict:
    """A reference-style ``lckv-llama`` dir from ``model``'s weights (bf16 storage,
    non-KV layers without k/v), sharded in two safetensors files with an index."""
    import torch
    from safetensors.torch import save_file

    targets = [int(t.rstrip("s")) for t in layer_types.split("_")]
    state = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if not any(
            f"layers.{i}.self_attn.{p}" in k
            for i, t in enumerate(targets)
            if t != i
            for p in ("k_proj", "v_proj")
        )
    }
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    os.makedirs(path)
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(path, file), metadata={"format": "pt"})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        **model.config.to_dict(),
        "model_type": "lckv-llama",
        "architectures": ["LCKVLlamaForCausalLM"],
        "layer_types": layer_types,
        "forward_passes": 3,
        "backward_passes": 2,
        "sliding_window": 5,
    }
    (path / "config.json").write_text(json.dumps(config))
    return state


@pytest.mark.hf
def test_lckv_import_layout_and_kv_placement(hf_llama, tmp_path):
    model, _ = hf_llama
    state = write_lckv(model, tmp_path / "lckv", "0_2_2s_3")
    workdir = str(tmp_path / "wd")
    assert convert_cli("--from-hf", str(tmp_path / "lckv"), "--workdir", workdir) == 0
    cfg, params, _, _ = checkpoint.open_model(workdir)
    assert str(cfg.layout) == "0_2_2s_3"
    assert (cfg.forward_passes, cfg.backward_passes, cfg.sliding_window) == (3, 2, 5)
    tree = params["params"]
    assert "k_proj" not in tree["layer_1"] and "v_proj" not in tree["layer_1"]
    for name in ("k_proj", "v_proj"):
        want = state[f"model.layers.2.self_attn.{name}.weight"].float().numpy().T
        np.testing.assert_array_equal(np.asarray(tree["layer_2"][name]["kernel"]), want)
    # a KV layer's weights land in that layer only: layer 2's K differs from layer 3's
    assert not np.allclose(tree["layer_2"]["k_proj"]["kernel"], tree["layer_3"]["k_proj"]["kernel"])


# ----------------------------------------------------------- layout conversion
@pytest.mark.hf
def test_kv_init_copy_keeps_each_kv_layers_own_weights(hf_llama, tmp_path):
    model, path = hf_llama
    workdir = str(tmp_path / "wd")
    assert convert_cli("--from-hf", path, "--workdir", workdir, "--layout", "cla:2") == 0
    cfg, params, _, _ = checkpoint.open_model(workdir)
    assert cfg.layout.targets == (0, 0, 2, 2)
    tree = params["params"]
    for j in (0, 2):
        want = hf_weight(model, f"model.layers.{j}.self_attn.v_proj.weight").T
        np.testing.assert_array_equal(np.asarray(tree[f"layer_{j}"]["v_proj"]["kernel"]), want)
    assert "k_proj" not in tree["layer_1"] and "k_proj" not in tree["layer_3"]


@pytest.mark.hf
def test_kv_init_average_means_reading_layers_and_trains(hf_llama, tmp_path):
    """``lckv:1`` = targets 0,3,3,3: layer 3's K/V become the mean of layers 1..3's;
    then a few Adam steps on the converted params lower the loss (optax directly)."""
    model, path = hf_llama
    workdir = str(tmp_path / "wd")
    args = ("--from-hf", path, "--workdir", workdir, "--layout", "lckv:1", "--kv-init", "average")
    assert convert_cli(*args) == 0
    cfg, params, _, _ = checkpoint.open_model(workdir)
    assert cfg.layout.targets == (0, 3, 3, 3)
    for name in ("k_proj", "v_proj"):
        hf = [hf_weight(model, f"model.layers.{i}.self_attn.{name}.weight").T for i in range(4)]
        got = np.asarray(params["params"]["layer_3"][name]["kernel"])
        np.testing.assert_allclose(got, (hf[1] + hf[2] + hf[3]) / 3, atol=1e-6)
        np.testing.assert_array_equal(
            np.asarray(params["params"]["layer_0"][name]["kernel"]), hf[0]
        )

    toks = jnp.asarray(random_tokens(seed=2, batch=4, length=16), jnp.int32)
    cfg = dataclasses.replace(cfg, forward_passes=1)  # fewer iterations: a faster test
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logits = forward(cfg, p, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @jax.jit
    def step(p, opt):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, losses = tx.init(params), []
    for _ in range(5):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.hf
def test_kvshare_train_init_from_starts_from_the_converted_weights(tmp_path):
    """``kvshare train --init-from`` takes the converted model (layout, shapes, vocab) and
    its tokenizer and weights: one step at learning rate 0 saves exactly those params."""
    import trainutil as tu

    from kvshare_jax import checkpoint
    from kvshare_jax.data.tokenizer import Tokenizer

    hf, converted, run = (str(tmp_path / name) for name in ("hf", "converted", "run"))
    save_hf_llama(hf, vocab=512)
    tok = Tokenizer.load(tu.tokenizer_path())  # 512 pieces of the embedded corpus
    tok.save(os.path.join(hf, checkpoint.TOKENIZER_FILE))  # travels with the conversion
    args = ("--from-hf", hf, "--workdir", converted, "--layout", "lckv:1")
    assert convert_cli(*args, "--kv-init", "average") == 0
    overrides = (*tu.TINY, "train.num_steps=1", "train.learning_rate=0.0", "train.eval_steps=1")
    argv = ["train", "--config", tu.TINY_CONFIG, "--workdir", run, "--init-from", converted]
    assert cli.main(argv + [f"--config.{o}" for o in overrides]) == 0
    cfg, params, tokenizer, step = checkpoint.open_model(run)
    src_cfg, src_params, _, _ = checkpoint.open_model(converted)
    assert step == 1 and cfg.layout.targets == (0, 3, 3, 3)
    assert (cfg.vocab_size, cfg.d_model, cfg.max_len) == (512, 64, 128)
    assert tokenizer.model_proto == tok.model_proto  # the source's, copied into the run
    tu.assert_trees_equal(params, src_params)
    assert cfg == dataclasses.replace(src_cfg, forward_passes=cfg.forward_passes)


def test_kvshare_train_init_from_a_missing_dir_is_a_one_line_error(tmp_path, capsys):
    import trainutil as tu

    argv = ["train", "--config", tu.TINY_CONFIG, "--workdir", str(tmp_path / "run")]
    assert cli.main([*argv, "--init-from", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "neither a workdir nor a HuggingFace model dir" in err and len(err.splitlines()) == 1


@pytest.mark.hf
def test_sliding_layout_needs_a_window(hf_llama, tmp_path, capsys):
    _, path = hf_llama
    workdir = str(tmp_path / "wd")
    assert convert_cli("--from-hf", path, "--workdir", workdir, "--layout", "yoco") == 2
    assert "--sliding-window" in capsys.readouterr().err
    args = ("--from-hf", path, "--workdir", workdir, "--layout", "yoco", "--sliding-window", "8")
    assert convert_cli(*args) == 0
    cfg = checkpoint.model_config_of(workdir)
    assert str(cfg.layout) == "0s_1s_2_2" and cfg.sliding_window == 8


# ---------------------------------------------------------------------- export
@pytest.mark.hf
def test_export_standard_reimports_identically_and_loads_in_transformers(imported, tmp_path):
    import transformers

    out = str(tmp_path / "export")
    assert convert_cli("--to-hf", out, "--workdir", imported) == 0
    hf = json.loads(open(os.path.join(out, "config.json")).read())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    cfg, params, _, _ = checkpoint.open_model(imported)
    cfg2, params2, _, _ = checkpoint.open_model(out)  # the HF dir, read directly
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    toks = random_tokens(seed=3)
    ours = np.asarray(forward(cfg, params, jnp.asarray(toks, jnp.int32)))
    np.testing.assert_allclose(hf_logits(model, toks), ours, atol=1e-4, rtol=0)


@pytest.mark.hf
def test_export_shared_layout_writes_lckv_without_non_kv_weights(hf_llama, tmp_path):
    _, path = hf_llama
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "export")
    assert convert_cli("--from-hf", path, "--workdir", workdir, "--layout", "0_2_2_3") == 0
    assert convert_cli("--to-hf", out, "--workdir", workdir) == 0
    hf = json.loads(open(os.path.join(out, "config.json")).read())
    assert hf["model_type"] == "lckv-llama" and hf["layer_types"] == "0_2_2_3"
    assert (hf["forward_passes"], hf["backward_passes"]) == (7, 2)
    names = saved_names(out)
    assert "model.layers.1.self_attn.k_proj.weight" not in names
    assert "model.layers.2.self_attn.k_proj.weight" in names
    cfg, params, _, _ = checkpoint.open_model(workdir)
    cfg2, params2, _, _ = checkpoint.open_model(out)
    assert cfg2.layout == cfg.layout
    jax.tree.map(np.testing.assert_array_equal, params2, params)


# ------------------------------------------------------------------ CLI errors
def test_cli_errors_are_one_line(tmp_path, capsys):
    """Missing dir, missing config.json, unsupported model_type, existing workdir."""
    no_config = tmp_path / "empty"
    no_config.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    llama = tmp_path / "llama"
    llama.mkdir()
    dims = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2}
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", **dims}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model_config.json").write_text("{}")
    cases = [
        (tmp_path / "missing", tmp_path / "wd1", "is not a directory"),
        (no_config, tmp_path / "wd2", "config.json not found"),
        (gpt2, tmp_path / "wd3", "unsupported model_type 'gpt2'"),
        (llama, tmp_path / "wd4", "lacks intermediate_size"),
    ]
    for src, workdir, message in cases:
        assert convert_cli("--from-hf", str(src), "--workdir", str(workdir)) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvshare convert: error: ") and message in err
        assert err.count("\n") == 1
        assert not os.path.exists(workdir)
    assert convert_cli("--from-hf", str(llama), "--workdir", str(taken)) == 2
    assert "already holds a model" in capsys.readouterr().err
    (llama / "config.json").write_text(
        json.dumps({"model_type": "llama", "intermediate_size": 16, **dims})
    )
    assert convert_cli("--from-hf", str(llama), "--workdir", str(tmp_path / "wd5")) == 2
    assert "no weights in" in capsys.readouterr().err
    assert convert_cli("--to-hf", str(tmp_path / "out"), "--workdir", str(no_config)) == 2
    assert "neither a workdir nor" in capsys.readouterr().err


# ------------------------------------------------------------- bad HF input
def tiny_hf_dir(path) -> str:
    """A valid exported ``llama`` dir (L=2, d=8) to corrupt (HF's files need the ``[hf]``
    extra's safetensors: skipped without it)."""
    pytest.importorskip("safetensors")
    from kvshare_jax.model import ModelConfig, init_params

    cfg = ModelConfig.create(
        "standard", 2, vocab_size=16, d_model=8, num_heads=2, num_kv_heads=2, d_ff=16
    )
    workdir = str(path / "src_wd")
    convert.save_workdir(workdir, cfg, init_params(cfg, jax.random.key(0)))
    out = str(path / "hf")
    convert.export_hf(workdir, out)
    return out


def _edit_config(hf_dir: str, **changes) -> None:
    path = os.path.join(hf_dir, "config.json")
    config = json.loads(open(path).read())
    config.update(changes)
    open(path, "w").write(json.dumps(config))


def _edit_tensors(hf_dir: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _as_bin(hf_dir: str, payload) -> None:
    import torch

    os.remove(os.path.join(hf_dir, "model.safetensors"))
    path = os.path.join(hf_dir, "pytorch_model.bin")
    if isinstance(payload, bytes):
        open(path, "wb").write(payload)
    else:
        torch.save(payload, path)


class _NotATensor:
    """A pickled instance of this class is refused by ``torch.load(weights_only=True)``."""


BAD_INPUTS = {
    "garbage safetensors": (
        lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"\x07" * 64),
        "model.safetensors is not a readable safetensors file",
    ),
    "garbage bin": (lambda d: _as_bin(d, b"not a checkpoint" * 8), "is not a PyTorch checkpoint"),
    "refused pickle": (
        lambda d: _as_bin(d, {"model.norm.weight": _NotATensor()}),
        "refused by torch.load(weights_only=True): Unsupported global",
    ),
    "bin not a dict": (lambda d: _as_bin(d, [1, 2]), "expected a state dict"),
    "layer_types 5": (
        lambda d: _edit_config(d, model_type="lckv-llama", layer_types=5),
        "layer_types must be a mapping string",
    ),
    "layer_types bad target": (
        lambda d: _edit_config(d, model_type="lckv-llama", layer_types="1_0"),
        "layer 0: target 1 is not a KV layer",
    ),
    "rope_scaling string": (
        lambda d: _edit_config(d, rope_scaling="llama3"),
        "rope_scaling must be an object or null, got 'llama3'",
    ),
    "rope_scaling llama3": (
        lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "unsupported RoPE scaling 'llama3'",
    ),
    "layers as string": (
        lambda d: _edit_config(d, num_hidden_layers="3"),
        "num_hidden_layers must be an integer >= 1, got '3'",
    ),
    "zero heads": (
        lambda d: _edit_config(d, num_attention_heads=0),
        "num_attention_heads must be an integer >= 1, got 0",
    ),
    "negative kv heads": (
        lambda d: _edit_config(d, num_key_value_heads=-2),
        "num_key_value_heads must be an integer >= 1, got -2",
    ),
    "heads not dividing": (
        lambda d: _edit_config(d, hidden_size=9, head_dim=None),
        "hidden_size (9) must be a multiple of num_attention_heads (2)",
    ),
    "kv heads not dividing": (
        lambda d: _edit_config(d, num_key_value_heads=3),
        "num_attention_heads (2) must be a multiple of num_key_value_heads (3)",
    ),
    "float vocab": (
        lambda d: _edit_config(d, vocab_size=16.0),
        "vocab_size must be an integer >= 1, got 16.0",
    ),
    "negative eps": (
        lambda d: _edit_config(d, rms_norm_eps=-1e-5),
        "rms_norm_eps must be a positive number",
    ),
    "tie as string": (
        lambda d: _edit_config(d, tie_word_embeddings="yes"),
        "tie_word_embeddings must be true or false",
    ),
    "unknown model_type": (lambda d: _edit_config(d, model_type="mistral"), "'mistral'"),
    "invalid json": (
        lambda d: open(os.path.join(d, "config.json"), "w").write('{"model_type": "llama",'),
        "config.json is not valid JSON",
    ),
    "json list": (
        lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]"),
        "config.json holds a JSON list, expected an object",
    ),
    "missing tensor": (
        lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "tensor model.layers.1.mlp.up_proj.weight is missing",
    ),
    "wrong shape": (
        lambda d: _edit_tensors(
            d, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)})
        ),
        "tensor model.norm.weight has shape (7,), expected (8,)",
    ),
    "integer tensor": (
        lambda d: _edit_tensors(d, lambda t: t.update({"model.norm.weight": np.ones(8, np.int32)})),
        "'model.norm.weight' is not a floating-point tensor",
    ),
    "index names a missing shard": (
        lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
        ),
        "model-00001-of-00002.safetensors (listed in",
    ),
    "index without weight_map": (
        lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write("{}"),
        "has no weight_map",
    ),
}


@pytest.mark.hf
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_hf_input_is_a_one_line_error(case, tmp_path, capsys):
    """Each corrupt or malformed HF directory: exit 2, one line naming the problem, and
    no workdir left behind."""
    pytest.importorskip("torch")
    break_it, message = BAD_INPUTS[case]
    hf_dir = tiny_hf_dir(tmp_path)
    capsys.readouterr()
    break_it(hf_dir)
    workdir = tmp_path / "wd"
    assert convert_cli("--from-hf", hf_dir, "--workdir", str(workdir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvshare convert: error: ") and message in err, err
    assert err.count("\n") == 1
    assert not workdir.exists()


# ------------------------------------------------------- tokenizer.json models
def save_json_tokenizer(folder, texts: list[str], vocab: int) -> None:
    """A WordLevel ``tokenizer.json`` trained offline on ``texts`` (``<pad>``, ``</s>``,
    ``<s>``, ``<unk>`` first), plus a ``tokenizer_config.json`` naming EOS and BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=specials)
    )
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", "add_bos_token": False}
    open(os.path.join(folder, "tokenizer_config.json"), "w").write(json.dumps(config))


@pytest.mark.hf
def test_tokenizer_json_survives_import_generate_and_export(tmp_path, capsys):
    """A HF dir with only ``tokenizer.json``: import keeps it (and its config), ``kvshare
    generate`` encodes/decodes with it, export writes it back with the special ids;
    ``--prompt-ids`` works on a workdir without any tokenizer."""
    from kvshare_jax.data.tokenizer import JsonTokenizer, load_tokenizer

    hf_dir = tiny_hf_dir(tmp_path)
    save_json_tokenizer(hf_dir, ["the cat sat on the mat", "a dog ran to the park"], 16)
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "export")
    assert convert_cli("--from-hf", hf_dir, "--workdir", workdir, "--layout", "0_0") == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(workdir, name)).read() == open(os.path.join(hf_dir, name)).read()
    tok = load_tokenizer(workdir)
    assert isinstance(tok, JsonTokenizer) and (tok.eos_id, tok.bos_id, tok.pad_id) == (1, 2, 0)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    capsys.readouterr()

    assert (
        cli.main(["generate", "--workdir", workdir, "--prompt", "the cat", "--max-new-tokens", "6"])
        == 0
    )
    text = capsys.readouterr().out.strip()
    cfg, params, _, _ = checkpoint.open_model(workdir)
    new = generate(cfg, params, [tok.encode("the cat")], max_new_tokens=6, stop_tokens=[1])
    ids = [int(t) for t in new.tokens[0, : int(new.lengths[0])] if t != 1]
    assert text == tok.decode(ids)

    bare = str(tmp_path / "bare")
    convert.save_workdir(bare, cfg, params)
    args = ["generate", "--workdir", bare, "--prompt-ids", "4,5", "--max-new-tokens", "3"]
    assert cli.main(args) == 0
    want = generate(cfg, params, [[4, 5]], max_new_tokens=3).tokens[0]
    assert capsys.readouterr().out.strip() == ",".join(str(int(t)) for t in want)

    assert convert_cli("--to-hf", out, "--workdir", workdir) == 0
    hf = json.loads(open(os.path.join(out, "config.json")).read())
    assert (hf["eos_token_id"], hf["bos_token_id"], hf["pad_token_id"]) == (1, 2, 0)
    assert (
        open(os.path.join(out, "tokenizer.json")).read()
        == open(os.path.join(hf_dir, "tokenizer.json")).read()
    )
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))


@pytest.mark.hf
def test_bad_tokenizer_json_is_a_one_line_error(tmp_path, capsys):
    hf_dir = tiny_hf_dir(tmp_path)
    open(os.path.join(hf_dir, "tokenizer.json"), "w").write('{"version": "1.0"}')
    capsys.readouterr()
    assert convert_cli("--from-hf", hf_dir, "--workdir", str(tmp_path / "wd")) == 2
    err = capsys.readouterr().err
    assert "not a HuggingFace tokenizer.json" in err and err.count("\n") == 1
    assert not (tmp_path / "wd").exists()
