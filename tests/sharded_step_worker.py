"""Child process of tests/test_sharding.py (8 fake CPU devices): one train step of the
tiny model on one device vs on a data=2 x fsdp=2 x tensor=2 mesh (also with gradient
accumulation), plus the CLI's error for a batch the data axes cannot split.
Prints one JSON object."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import ml_collections
import numpy as np
import trainutil as tu

from kvshare_jax import sharding, train
from kvshare_jax.commands import train as train_command
from kvshare_jax.config import model_config_from


def one_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, grad_accum: int):
    """``(loss, updated params on the host, the lm_head's per-device shard shape)``."""
    cfg = model_config_from(config, vocab_size=512)
    tx = train.make_optimizer(config.train)
    rules = sharding.logical_rules(config.mesh)
    _, shardings = train.state_shardings(cfg, tx, mesh, rules)
    state = train.init_state(cfg, tx, shardings, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, size=(8, 33), dtype=np.int32)
    mask = (rng.random((8, 32)) < 0.9).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    step = train.compile_train_step(cfg, tx, grad_accum, mesh, rules, shardings)
    state, metrics = step(state, batch)
    head = state.params["params"]["lm_head"]["kernel"]
    return (
        float(metrics["loss"]),
        jax.device_get(state.params),
        head.addressable_shards[0].data.shape,
    )


def max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    config = tu.tiny_config("model.num_layers=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    single_cfg = tu.tiny_config("model.num_layers=2", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    single = sharding.make_mesh(single_cfg.mesh, jax.devices()[:1])
    mesh = sharding.make_mesh(config.mesh)
    loss_1, params_1, shard_1 = one_step(single_cfg, single, 1)
    loss_8, params_8, shard_8 = one_step(config, mesh, 1)
    loss_acc, params_acc, _ = one_step(config, mesh, 2)

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        argv = [f"--config={tu.TINY_CONFIG}", "--workdir=/nonexistent/never-created"]
        argv += [f"--config.{o}" for o in tu.tiny_overrides("mesh.data=2", "mesh.fsdp=2")]
        argv += ["--config.mesh.tensor=2", "--config.train.batch_size=6"]
        rc = train_command.run(argv)
    print(
        json.dumps(
            {
                "mesh_shape": dict(mesh.shape),
                "loss": [loss_1, loss_8, loss_acc],
                "params_diff": max_abs_diff(params_1, params_8),
                "params_diff_accum": max_abs_diff(params_1, params_acc),
                "head_shard": [list(shard_1), list(shard_8)],
                "bad_batch": [rc, err.getvalue()],
            }
        )
    )


if __name__ == "__main__":
    main()
