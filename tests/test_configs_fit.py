"""Every shipped config compiles and fits on the TPU slice its docstring names.

Each config file's docstring has a line ``Target slice: <topology>``. The train step is
compiled for that slice with the config's attention (``auto``: Pallas on TPU) and with
the XLA reference; study configs are also compiled with their most memory-hungry layout
(pizza-top at the smallest l: one cyclic block over almost every layer, iterated).
"""

import importlib.util
import re
from pathlib import Path

import jax
import pytest

pytest.importorskip("libtpu", reason="TPU compiles need libtpu (the [tpu] extra)")

from kvshare_jax import aot
from kvshare_jax.config import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.py"))
# the default run: the main job's config both ways, the study's as written; the rest
# (default.py and llama_tiny.py take 2-4 minutes each on 2 cores) run with -m slow
DEFAULT_RUN = {"configs/tiny.py-config-config", "configs/tiny.py-config-xla",
               "study/cpu.py-config-config"}  # fmt: skip


def _slice(path: Path) -> str:
    spec = importlib.util.spec_from_file_location("_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m = re.search(r"Target slice: (\S+)", module.__doc__ or "")
    assert m, f"{path} names no 'Target slice: <topology>' in its docstring"
    return m.group(1).rstrip(".")


def _cases():
    for path in CONFIGS:
        layouts = ["config"]
        if path.parent.name == "study":
            layouts.append("worst")
        for layout in layouts:
            for impl in ("config", "xla"):
                name = f"{path.parent.name}/{path.name}-{layout}-{impl}"
                marks = () if name in DEFAULT_RUN else (pytest.mark.slow,)
                yield pytest.param(path, layout, impl, id=name, marks=marks)


@pytest.fixture(autouse=True)
def _default_precision():
    """conftest asks for fp32 ("highest") matmuls, which TPUs emulate in several bf16
    passes and compile much more slowly; these tests compare no numbers."""
    with jax.default_matmul_precision("default"):
        yield


def test_every_config_names_a_slice():
    for path in CONFIGS:
        aot.topology(_slice(path))  # a valid topology


@pytest.mark.parametrize("path,layout,impl", list(_cases()))
def test_config_fits_its_slice(path, layout, impl):
    overrides = [] if impl == "config" else [f"model.attention_impl={impl}"]
    config = load_config(str(path))
    if layout == "worst":
        overrides.append(f"model.layout=pizza-top:{min(config.study.kv_layers)}")
    config = load_config(str(path), tuple(overrides))
    out = aot.train_program(config, aot.topology(_slice(path)))
    assert out["fits"], (
        f"{path.name} ({layout}, {impl}) needs {out['bytes_per_device']['total']} bytes per "
        f"device of {out['hbm_bytes_per_device']}"
    )
