"""Checkpoint layout, inference loading, fallback from a corrupt step, NaN stops."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainutil as tu

from kvshare_jax import checkpoint
from kvshare_jax import train as train_module
from kvshare_jax.commands import train as train_command
from kvshare_jax.layout import from_spec
from kvshare_jax.model import ModelConfig
from kvshare_jax.train import train_and_evaluate


def tree_digest(path: str) -> str:
    """Hash of every file's relative path and bytes under ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_model_config_json_round_trip_keeps_the_layout():
    cfg = ModelConfig(layout=from_spec("yoco", 6), sliding_window=16, vocab_size=300)
    restored = checkpoint.model_config_from_dict(checkpoint.model_config_to_dict(cfg))
    assert restored == cfg
    assert checkpoint.model_config_to_dict(cfg)["layout"] == "0s_1s_2s_3_3_3"


def test_workdir_layout():
    workdir = tu.reference_run()
    assert {"config.json", "model_config.json", "metrics.jsonl", "checkpoints"} <= set(
        os.listdir(workdir)
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["100", "200"]
    items = set(os.listdir(os.path.join(workdir, "checkpoints", "200")))
    assert {"params", "opt_state", "data_iter"} <= items
    assert checkpoint.load_run_config(workdir).train.num_steps == 200
    assert str(checkpoint.load_model_config(workdir).layout) == "0_1_2_3"


def test_open_model_gives_config_params_tokenizer_and_step():
    cfg, params, tokenizer, step = checkpoint.open_model(tu.reference_run())
    assert step == 200
    assert cfg.vocab_size == tokenizer.vocab_size <= 512
    assert cfg.num_layers == 4 and cfg.d_model == 64
    _, trained, _, _ = tu.restore_newest(tu.reference_run())
    tu.assert_trees_equal(params, trained)
    assert tokenizer.decode(tokenizer.encode("def f(x): return x")) == "def f(x): return x"


def test_open_model_without_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a workdir nor a HuggingFace"):
        checkpoint.open_model(str(tmp_path))
    for name in ("config.json", "model_config.json"):
        shutil.copy(os.path.join(tu.reference_run(), name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.open_model(str(tmp_path))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax reader
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    workdir = tu.copy_run(tmp_path)
    params_dir = os.path.join(workdir, "checkpoints", "200", "params")
    files = [os.path.join(r, f) for r, _, fs in os.walk(params_dir) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)

    with caplog.at_level(logging.WARNING):
        _, _, _, step = checkpoint.open_model(workdir)
    assert step == 100
    assert "checkpoint step 200 is unreadable" in caplog.text

    # Resuming falls back to step 100, moves step 200 aside and ends where the
    # uninterrupted run ends.
    train_and_evaluate(tu.tiny_config(), workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints_corrupt")) == ["200"]
    _, params, opt_state, batch = tu.restore_newest(workdir)
    _, params_ref, opt_ref, batch_ref = tu.restore_newest(tu.reference_run())
    tu.assert_trees_equal(params, params_ref)
    tu.assert_trees_equal(opt_state, opt_ref)
    tu.assert_trees_equal(batch, batch_ref)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    workdir = tu.copy_run(tmp_path, keep_steps=(100,))
    before = tree_digest(os.path.join(workdir, "checkpoints"))
    argv = [f"--config={tu.TINY_CONFIG}", f"--workdir={workdir}"]
    argv += [f"--config.{o}" for o in tu.tiny_overrides()]
    # an infinite learning rate (the config refuses one, so the schedule is patched)
    monkeypatch.setattr(train_module, "make_schedule", lambda t: lambda step: jnp.inf)
    assert train_command.run(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # lr=inf turns the params into NaN at step 101; step 102's loss is NaN
    assert err.startswith("kvshare train: error: non-finite loss=nan, grad_norm=nan at step 102")
    assert "last good checkpoint: step 100" in err
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["100"]
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before
    _, params, _, step = checkpoint.open_model(workdir)
    assert step == 100
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
