"""Shared test setup: CPU only, fp32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from kvshare_jax.target import compile_only_libtpu  # noqa: E402

compile_only_libtpu()  # TPU compiles from several pytest workers at once

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402
import tinymodel  # noqa: E402


@pytest.fixture(scope="session")
def small_config():
    """The tests' tiny model config factory: ``small_config(spec, layers=6, **fields)``
    (one base shape, see ``tinymodel.py``)."""
    return tinymodel.small_config
