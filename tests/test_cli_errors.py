"""Bad input, anywhere: one line on stderr, exit status 2, nothing written.

Every ``kvshare`` command shares one convention (``-h``/``--help``, dashed flags with the
underscore spelling accepted, ``--config`` + ``--config.a.b=value``); every bad flag,
config file, field value, path or layout string is refused before any work starts.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest
import trainutil as tu

from kvshare_jax import train
from kvshare_jax.cli import main
from kvshare_jax.commands import train as train_command
from kvshare_jax.decode import KVCache, generate, init_cache, prefill
from kvshare_jax.model import ModelConfig, forward, init_params
from kvshare_jax.prefill import Prefill

STUDY = os.path.join(tu.ROOT, "configs", "study", "cpu.py")


def _files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"kvshare {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def bad_files(tmp_path):
    """Config files that cannot load, and a plain file where a directory is expected."""
    files = {
        "syntax": "def get_config(:\n",
        "raises": "raise RuntimeError('boom')\n",
        "noget": "x = 1\n",
        "returns": "def get_config():\n    return 3\n",
        "json": "{not json",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / (f"{name}.py" if name != "json" else "config.json")
        paths[name].write_text(text)
    paths["file"] = tmp_path / "a_file"
    paths["file"].write_text("x")
    return paths


def _train(workdir, *extra):
    return ["train", "--config", tu.TINY_CONFIG, "--workdir", str(workdir), *extra]


def _generate(*extra):
    return ["generate", "--config", tu.TINY_CONFIG, "--prompt-ids", "1,2", *extra]


# (argv builder, stderr substring); `w` is a workdir that must stay unwritten, `f` the
# bad files above.
CASES = {
    "unknown train field": (lambda w, f: _train(w, "--config.train.foo=1"), "'train.foo'"),
    "unknown field, close": (
        lambda w, f: _train(w, "--config.train.num_step=1"),
        "did you mean train.num_steps",
    ),
    "unknown section": (lambda w, f: _train(w, "--config.trian.seed=1"), "'trian'"),
    "study unknown field": (
        lambda w, f: ["study", "--config", STUDY, "--workdir", str(w), "--config.train.foo=1"],
        "'train.foo'",
    ),
    "generate unknown field": (lambda w, f: _generate("--config.model.foo=3"), "'model.foo'"),
    "dtype": (lambda w, f: _train(w, "--config.model.dtype=float7"), "got 'float7'"),
    "kv cache dtype": (
        lambda w, f: _train(w, "--config.model.kv_cache_dtype=int3"),
        "kv_cache_dtype must be '' (the model dtype, float32), int8 or float8_e4m3fn, got 'int3'",
    ),
    "generate kv cache dtype": (
        lambda w, f: _generate("--config.model.kv_cache_dtype=int3"),
        "kv_cache_dtype must be",
    ),
    "int field": (lambda w, f: _train(w, "--config.train.num_steps=abc"), "expects an integer"),
    "bool field": (lambda w, f: _train(w, "--config.model.remat=maybe"), "expects a boolean"),
    "syntax error": (
        lambda w, f: ["train", "--config", str(f["syntax"]), "--workdir", str(w)],
        "syntax error at line 1",
    ),
    "config raises": (
        lambda w, f: ["train", "--config", str(f["raises"]), "--workdir", str(w)],
        "raised RuntimeError: boom",
    ),
    "no get_config": (
        lambda w, f: ["train", "--config", str(f["noget"]), "--workdir", str(w)],
        "defines no get_config()",
    ),
    "get_config returns junk": (
        lambda w, f: ["train", "--config", str(f["returns"]), "--workdir", str(w)],
        "returned int",
    ),
    "invalid json names the file": (
        lambda w, f: ["train", "--config", str(f["json"]), "--workdir", str(w)],
        "config.json is not valid JSON",
    ),
    "missing config": (
        lambda w, f: ["train", "--config", "/nonexistent.py", "--workdir", str(w)],
        "config file /nonexistent.py not found",
    ),
    "workdir is a file": (lambda w, f: _train(f["file"]), "is a file"),
    "workdir under a file": (lambda w, f: _train(f["file"] / "run"), "is under a file"),
    "batch size 0": (lambda w, f: _train(w, "--config.train.batch_size=0"), "batch_size must"),
    "negative learning rate": (
        lambda w, f: _train(w, "--config.train.learning_rate=-1"),
        "train.learning_rate must be >= 0",
    ),
    "nan learning rate": (lambda w, f: _train(w, "--config.train.learning_rate=nan"), ">= 0"),
    "missing tokenizer": (
        lambda w, f: _train(w, f"--config.data.tokenizer_path={w}/tok/tokenizer.model"),
        "does not exist",
    ),
    "kv heads 0": (lambda w, f: _train(w, "--config.model.num_kv_heads=0"), "num_kv_heads"),
    "odd head dim": (
        lambda w, f: _train(w, "--config.model.d_model=36", "--config.model.num_heads=4"),
        "even for RoPE",
    ),
    "passes b=0": (lambda w, f: _train(w, "--config.model.backward_passes=0"), "b >= 1"),
    "non-ASCII digits": (lambda w, f: _train(w, "--config.model.layout=٠_١_٢_٣"), "layer 0"),
    "negative target names the layer": (
        lambda w, f: _train(w, "--config.model.layout=0_-1_2_3"),
        "layer 1: cannot parse '-1'",
    ),
    "full-width preset arg": (
        lambda w, f: _train(w, "--config.model.layout=sandwich-middle:２"),
        "needs an integer argument",
    ),
    "unknown flag": (lambda w, f: _train(w, "--bogus"), "unrecognized arguments: --bogus"),
    "missing --config": (lambda w, f: ["train", "--workdir", str(w)], "--config"),
    "eval negative steps": (
        lambda w, f: ["eval", "--workdir", str(w), "--eval_steps=-3"],
        "--eval-steps must be >= 1",
    ),
    "eval not a workdir": (lambda w, f: ["eval", "--workdir", str(w)], "not a training workdir"),
    "bench repeats 0": (
        lambda w, f: ["bench", "--config", tu.TINY_CONFIG, "--repeats", "0", "--out-dir", str(w)],
        "--repeats must be >= 1",
    ),  # fmt: skip
    "bench batch sizes": (
        lambda w, f: [
            "bench",
            "--config",
            tu.TINY_CONFIG,
            "--batch-sizes",
            "1,x",
            "--out-dir",
            str(w),
        ],
        "--batch-sizes needs positive integers",
    ),  # fmt: skip
    "bench tolerance without auto": (
        lambda w, f: [
            "bench",
            "--config",
            tu.TINY_CONFIG,
            "--prefill-passes",
            "3,2",
            "--prefill-tol",
            "0.1",
            "--out-dir",
            str(w),
        ],
        "--prefill-tol needs --prefill-passes=auto, got --prefill-passes=3,2",
    ),  # fmt: skip
    "bench out-dir is a file": (
        lambda w, f: ["bench", "--config", tu.TINY_CONFIG, "--out-dir", str(f["file"])],
        "--out-dir",
    ),
    "generate 0 new tokens": (
        lambda w, f: [
            "generate",
            "--config",
            tu.TINY_CONFIG,
            "--prompt-ids",
            "1",
            "--max_new_tokens",
            "0",
        ],
        "max_new_tokens",
    ),  # fmt: skip
    "generate one pass number": (
        lambda w, f: [
            "generate",
            "--config",
            tu.TINY_CONFIG,
            "--prompt-ids",
            "1",
            "--prefill-passes",
            "1",
        ],
        "two numbers",
    ),  # fmt: skip
    "layout command": (lambda w, f: ["layout", "0_-1_2"], "layer 1"),
    "study bad layout": (
        lambda w, f: [
            "study",
            "--config",
            STUDY,
            "--workdir",
            str(w),
            "--config.study.layouts=('standard','pizza-sideways')",
        ],
        "pizza-sideways",
    ),  # fmt: skip
    "study tolerance without auto": (
        lambda w, f: [
            "study",
            "--config",
            STUDY,
            "--workdir",
            str(w),
            "--config.study.prefill_passes=exact",
            "--config.study.prefill_tol=0.1",
        ],
        "study.prefill_tol needs study.prefill_passes=auto",
    ),  # fmt: skip
    "study batch size 0": (
        lambda w, f: [
            "study",
            "--config",
            STUDY,
            "--workdir",
            str(w),
            "--config.train.batch_size=0",
        ],
        "train.batch_size must be >= 1",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_files, tmp_path, capsys):
    build, message = CASES[case]
    workdir = tmp_path / "run"
    before = _files(tmp_path)
    argv = build(workdir, bad_files)
    assert main(argv) == 2
    err = _one_line_error(capsys, argv[0])
    assert message in err
    assert "Traceback" not in err
    assert _files(tmp_path) == before  # nothing written: no workdir, no tokenizer


@pytest.mark.parametrize("command", ["train", "eval", "study", "generate", "bench", "compile",
                                     "convert", "harness", "layout"])  # fmt: skip
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_answers_help(command, flag, capsys):
    assert main([command, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvshare {command}")
    assert "``" not in out  # docstring markup shown plainly


def test_underscore_and_dash_spellings_are_one_flag():
    parser = train_command.parser()
    parser.add_argument("--max-new-tokens", type=int)
    argv = ["--config=c", "--workdir", "w"]
    assert parser.parse_args([*argv, "--max_new_tokens=3"]).max_new_tokens == 3
    assert parser.parse_args([*argv, "--max-new-tokens", "4"]).max_new_tokens == 4
    args = parser.parse_args([*argv, "--coordinator_address=h:1", "--num_processes=2"])
    assert (args.coordinator_address, args.num_processes) == ("h:1", 2)


# ------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def upward():
    cfg = ModelConfig.create(
        "0_2_2", d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, vocab_size=50, max_len=16
    )
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("passes", [(3, 0), (0, 0), (1,), (1.5, 2), (-1, 2), "ab"])
def test_forward_and_prefill_refuse_bad_passes(upward, passes):
    cfg, params = upward
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"passes \(m, b\) needs"):
        forward(cfg, params, tokens, passes=passes)
    cache: KVCache = init_cache(cfg, 1, 8)
    with pytest.raises(ValueError, match=r"passes \(m, b\) needs"):
        prefill(cfg, params, cache, tokens, jnp.array([4]), passes=passes)
    with pytest.raises(ValueError, match=r"prefill_passes \(m, b\) needs"):
        generate(cfg, params, [[1, 2]], max_new_tokens=2, prefill_settings=Prefill(passes))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_kv_heads": 0}, "num_kv_heads must be a positive integer"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"d_model": 30, "num_heads": 4}, "multiple of num_heads"),
        ({"d_model": 36, "num_heads": 4}, "even for RoPE"),
        ({"head_dim": -2}, "head_dim must be >= 0"),
        ({"dtype": "float7"}, "dtype must be one of"),
        ({"rope_theta": float("nan")}, "rope_theta must be > 0"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"backward_passes": 0}, "b >= 1"),
        ({"kv_cache_dtype": "int3"}, "kv_cache_dtype must be '' .the model dtype, float32."),
        ({"kv_cache_dtype": "bfloat16"}, "kv_cache_dtype must be"),  # not the model dtype
    ],
)
def test_model_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.create("standard", 2, **fields)


# ---------------------------------------------------------------- train & resume
@pytest.fixture
def finished_run(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tu.reference_run(), workdir)
    return workdir


def _tiny_train(workdir, *overrides):
    argv = ["train", f"--config={tu.TINY_CONFIG}", f"--workdir={workdir}"]
    return argv + [f"--config.{o}" for o in tu.tiny_overrides(*overrides)]


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (("model.num_heads=8", "model.num_kv_heads=4"), ["model.num_heads 4 -> 8"]),
        (
            ("model.layout=0s_1s_2_3", "model.sliding_window=8"),
            ["model.layout 'standard' -> '0s_1s_2_3'", "model.sliding_window 0 -> 8"],
        ),
        (("data.tokenizer_train_docs=100",), ["data.tokenizer_train_docs 300 -> 100"]),
        (("train.learning_rate=1e-3",), ["train.learning_rate 0.003 -> 0.001"]),
        (("train.seed=1",), ["train.seed 0 -> 1"]),
    ],
)
def test_resume_refuses_a_changed_run_and_keeps_its_configs(finished_run, overrides, fields,
                                                            capsys):  # fmt: skip
    saved = {n: (finished_run / n).read_bytes() for n in ("config.json", "model_config.json")}
    assert main(_tiny_train(finished_run, "train.num_steps=300", *overrides)) == 2
    err = _one_line_error(capsys, "train")
    assert "holds another run" in err and all(f in err for f in fields), err
    assert {n: (finished_run / n).read_bytes() for n in saved} == saved


def test_resume_refuses_a_change_of_packing(finished_run, capsys):
    """The packing changes what every step computes: one line naming it; a run saved
    before ``data.packing`` existed (no such field in its config.json) is "concat"."""
    saved = json.loads((finished_run / "config.json").read_text())
    del saved["data"]["packing"]  # as an older version wrote it
    (finished_run / "config.json").write_text(json.dumps(saved))
    assert main(_tiny_train(finished_run, "data.packing=segments")) == 2
    err = _one_line_error(capsys, "train")
    assert "was trained with data.packing='concat', not 'segments'" in err, err
    assert main(_tiny_train(finished_run)) == 0  # the same packing resumes
    assert "already trained to step 200" in capsys.readouterr().out


def test_unknown_packing_is_refused(tmp_path, capsys):
    assert main(_tiny_train(tmp_path / "run", "data.packing=documents")) == 2
    err = _one_line_error(capsys, "train")
    assert "data.packing must be 'concat' or 'segments', got 'documents'" in err, err
    assert not (tmp_path / "run").exists()


def test_resume_may_change_steps_cadences_and_mesh(finished_run, capsys):
    changed = ("train.log_every=50", "train.eval_steps=2", "mesh.fsdp=1", "model.remat=true")
    assert main(_tiny_train(finished_run, *changed)) == 0
    out = capsys.readouterr().out
    assert "already trained to step 200" in out
    # the start-up summary: devices, mesh, parameter count, fields away from defaults
    assert "devices: 1 x cpu" in out and "mesh: data=1 fsdp=1 tensor=1" in out
    assert "parameters: 0." in out and "train.log_every=50" in out


def test_saved_config_json_reproduces_the_run(finished_run, capsys):
    config = finished_run / "config.json"
    assert main(["train", f"--config={config}", f"--workdir={finished_run}"]) == 0
    assert "already trained to step 200" in capsys.readouterr().out
    # the saved JSON round-trips: same fields and types as the config that wrote it
    loaded = train_command.load([f"--config={config}", "--workdir=w"], train_command.parser())[1]
    assert json.loads(loaded.to_json()) == json.loads(config.read_text())
    assert isinstance(loaded.mesh.rules, tuple) and isinstance(loaded.train.learning_rate, float)


def test_check_resume_ignores_a_workdir_without_a_run(tmp_path):
    train.check_resume(str(tmp_path), tu.tiny_config())  # nothing saved: nothing to compare
