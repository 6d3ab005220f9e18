"""Shared pieces of the training tests: a tiny run config, and per test session a
tokenizer, a reference run and a persistent compilation cache, each built once and
shared by pytest-xdist workers and child processes; helpers to run ``kvshare``."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from kvshare_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")


def _session_dir() -> str:
    """A directory shared by this test session's processes (xdist workers, children).

    A single-process session removes it at exit; xdist sessions leave theirs (no worker
    knows it is the last), so directories older than a day are removed here.
    """
    if "KVSHARE_TEST_SESSION" not in os.environ:
        for old in glob.glob(os.path.join(tempfile.gettempdir(), "kvshare-tests-*")):
            if time.time() - os.path.getmtime(old) > 86400:
                shutil.rmtree(old, ignore_errors=True)
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
        path = os.path.join(tempfile.gettempdir(), f"kvshare-tests-{run}")
        os.makedirs(path, exist_ok=True)
        if "PYTEST_XDIST_WORKER" not in os.environ:
            atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["KVSHARE_TEST_SESSION"] = path  # inherited by child processes
    return os.environ["KVSHARE_TEST_SESSION"]


SESSION = _session_dir()
CACHE_DIR = os.path.join(SESSION, "jax-cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@contextlib.contextmanager
def _locked(name: str):
    """Serialises a block across the session's processes."""
    with open(os.path.join(SESSION, f"{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(name: str, build: Callable[[str], None]) -> str:
    """``<session>/<name>``, made by ``build(path)`` by the first process that asks."""
    path = os.path.join(SESSION, name)
    with _locked(name):
        if not os.path.exists(path + ".done"):
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            open(path + ".done", "w").close()
    return path


# `kvshare` in a child process, with this module imported first (compilation cache).
_CLI = "import sys, trainutil; from kvshare_jax.cli import main; sys.exit(main(sys.argv[1:]))"

# A 4-layer, d=64 model on 8 x 32-token batches; 200 steps take a few seconds after
# compilation. Checkpoints at steps 100 and 200; the logged loss is the mean of 100 steps.
TINY = (
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=128",
    "model.max_len=64",
    "data.vocab_size=512",
    "data.tokenizer_train_docs=300",
    "train.seq_len=32",
    "train.batch_size=8",
    "train.num_steps=200",
    "train.warmup_steps=10",
    "train.learning_rate=3e-3",
    "train.log_every=100",
    "train.eval_every=0",
    "train.eval_steps=4",
    "train.checkpoint_every=100",
)


@functools.cache
def tokenizer_path() -> str:
    """A 512-piece tokenizer of the embedded corpus."""
    from kvshare_jax.data import get_tokenizer

    def build(path: str) -> None:
        get_tokenizer(load_config(TINY_CONFIG, TINY).data, path)

    return os.path.join(_build_once("tokenizer", build), "tokenizer.model")


def tiny_overrides(*overrides: str) -> tuple[str, ...]:
    return (*TINY, f"data.tokenizer_path={tokenizer_path()}", *overrides)


def tiny_config(*overrides: str) -> ml_collections.ConfigDict:
    """configs/tiny.py shrunk by ``TINY``, then ``overrides`` (``"train.num_steps=4"``)."""
    return load_config(TINY_CONFIG, tiny_overrides(*overrides))


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """Environment for a CPU-only child sharing the compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", KVSHARE_TEST_SESSION=SESSION)
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # Same matmul precision as this process (tests/conftest.py), so compiled programs match.
    if jax.config.jax_default_matmul_precision:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    return env


TIMING = ("tokens_per_sec", "step_time_s", "tflops_per_device", "mfu")  # per-run speed


def without_timing(records: list[dict]) -> list[dict]:
    """Metric records without the fields that time the run (the rest is deterministic)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_cmd(workdir: str, *overrides: str) -> list[str]:
    """argv of ``kvshare train`` on the tiny config with ``overrides``."""
    argv = [sys.executable, "-c", _CLI, "train", f"--workdir={workdir}", f"--config={TINY_CONFIG}"]
    return argv + [f"--config.{o}" for o in tiny_overrides(*overrides)]


def run_train(workdir: str, *overrides: str, timeout: float = 300):
    """Runs ``kvshare train`` in a child process; returns the CompletedProcess."""
    return subprocess.run(
        train_cmd(workdir, *overrides),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@functools.cache
def reference_run() -> str:
    """Workdir of one uninterrupted ``standard`` run of ``TINY`` (do not modify it)."""
    from kvshare_jax.train import train_and_evaluate

    return _build_once("reference", lambda path: train_and_evaluate(tiny_config(), path))


def assert_trees_equal(a, b) -> None:
    """Bitwise equality of two pytrees of arrays (same structure)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore_newest(workdir: str) -> tuple[int, object, object, dict[str, np.ndarray]]:
    """``(step, params, opt_state, next batch)`` exactly as a resumed run sees them."""
    from kvshare_jax.checkpoint import Checkpointer, load_run_config
    from kvshare_jax.train import Trainer

    trainer = Trainer(load_run_config(workdir), workdir)
    ckpt = Checkpointer(workdir, max_to_keep=3)
    data_iter = trainer.iterator(trainer.config.data.train_split)
    step, params, opt_state = ckpt.restore(
        trainer.abstract.params, trainer.abstract.opt_state, data_iter
    )
    ckpt.close()
    return step, jax.device_get(params), jax.device_get(opt_state), next(data_iter)


def fake_study_result(cell, ppl: float, tok_s: float, step_s: float = 0.1) -> dict:
    """A cell result with the fields the report reads."""
    fraction = cell.kv_layers / 6
    run = {"batch": 1, "e2e_tok_s": tok_s, "prefill_s": 0.01}
    return {
        "cache_fraction": fraction,
        "train": {"eval_loss": 1.0, "eval_ppl": ppl},
        "train_step": {"min_s": step_s, "median_s": step_s},
        "bench": {"max_batch": int(10 / fraction), "max_batch_run": run, "runs": [run]},
        "wall_s": 1.0,
    }


def run_fake_study(monkeypatch, workdir: str, layouts: str) -> dict:
    """``study.run_study`` of configs/study/cpu.py over ``layouts`` (a tuple literal)
    with every cell's training replaced by :func:`fake_study_result`; its results."""
    from kvshare_jax import study
    from kvshare_jax.config import load_config

    config = load_config(
        os.path.join(ROOT, "configs", "study", "cpu.py"),
        (f"study.layouts={layouts}", f"data.tokenizer_path={tokenizer_path()}"),
    )

    def fake_cell(cell_config, cell, cell_dir, known_max_batch=None):
        os.makedirs(cell_dir)
        return fake_study_result(cell, 20.0, 100.0)

    monkeypatch.setattr(study, "run_cell", fake_cell)
    return study.run_study(config, workdir)


def copy_run(tmp_path, keep_steps: tuple[int, ...] = (100, 200)) -> str:
    """A copy of the reference run under ``tmp_path`` keeping checkpoints ``keep_steps``."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run(), workdir)
    for step in (100, 200):
        if step not in keep_steps:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    return workdir
