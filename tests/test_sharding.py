"""Mesh construction, logical-axis shardings and a sharded train step (8 CPU devices)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import ml_collections
import pytest
import trainutil as tu
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from kvshare_jax import sharding
from kvshare_jax.config import default_config, model_config_from
from kvshare_jax.model import init_params


def mesh_config(data: int, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    config = default_config().mesh
    config.unlock()
    config.update(data=data, fsdp=fsdp, tensor=tensor)
    return config


def test_mesh_shape_fills_the_minus_one_axis():
    assert sharding.mesh_shape(mesh_config(-1, 2, 1), 8) == (4, 2, 1)
    assert sharding.mesh_shape(mesh_config(1, -1, 2), 8) == (1, 4, 2)
    assert sharding.mesh_shape(mesh_config(2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((2, 2, 1), "has 4 devices but 8 are available"),
        ((-1, 3, 1), "8 is not a multiple of 3"),
        ((-1, -1, 1), "at most one -1"),
        ((0, 1, 1), "positive"),
    ],
)
def test_mesh_shape_errors_name_the_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(mesh_config(*sizes), 8)


def test_make_mesh_has_auto_data_fsdp_tensor_axes():
    mesh = sharding.make_mesh(mesh_config(-1, 1, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert mesh.devices.size == jax.device_count()


def test_rules_from_json_lists_equal_rules_from_tuples():
    config = default_config().mesh
    as_json = ml_collections.ConfigDict(json.loads(config.to_json()))
    assert sharding.logical_rules(as_json) == sharding.logical_rules(config)
    assert ("batch", ("data", "fsdp")) in sharding.logical_rules(config)


def test_param_and_batch_shardings_follow_the_rules():
    config = default_config()
    cfg = model_config_from(config, vocab_size=256)
    rules = sharding.logical_rules(config.mesh)
    mesh = sharding.make_mesh(mesh_config(-1, 1, 1))
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(cfg, mesh, rules))
    p = specs["params"]
    assert p["embed"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert p["lm_head"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert p["layer_0"]["q_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert p["layer_0"]["down_proj"]["kernel"] == PartitionSpec("tensor", "fsdp")
    assert p["final_norm"]["scale"] == PartitionSpec(None)
    assert sharding.batch_sharding(mesh, rules).spec == PartitionSpec(("data", "fsdp"), None)


def test_batch_must_split_over_data_and_fsdp():
    rules = sharding.logical_rules(default_config().mesh)
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    assert sharding.data_parallel_size(mesh, rules) == 4
    sharding.check_batch_divisible(8, mesh, rules)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by .* size 4"):
        sharding.check_batch_divisible(6, mesh, rules)


def test_sharded_train_step_matches_single_device():
    """Same loss and updated params (1e-5) on 1 device and on a 2x2x2 mesh of 8,
    also when the step accumulates 2 micro-batches."""
    result = subprocess.run(
        [sys.executable, "tests/sharded_step_worker.py"],
        env=tu.subprocess_env(devices=8),
        cwd=tu.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    loss_1, loss_8, loss_acc = out["loss"]
    assert loss_8 == pytest.approx(loss_1, abs=1e-5)
    assert loss_acc == pytest.approx(loss_1, abs=1e-5)
    assert out["params_diff"] < 1e-5
    assert out["params_diff_accum"] < 1e-5
    # lm_head [d=64, v=512]: whole on one device, split over fsdp x tensor on the mesh
    assert out["head_shard"] == [[64, 512], [32, 256]]
    rc, err = out["bad_batch"]
    assert rc == 2 and "train.batch_size size 6 is not divisible by the data-parallel size 4" in err


def test_unshardable_param_shapes_are_named():
    config = default_config()
    cfg = model_config_from(config, vocab_size=1023)  # e.g. a tokenizer's odd vocabulary
    rules = sharding.logical_rules(config.mesh)
    mesh = AbstractMesh((1, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0)),
        sharding.param_shardings(cfg, mesh, rules),
    )
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\] of shape \(1023, 512\)"):
        sharding.check_shardable(abstract)
