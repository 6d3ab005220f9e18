"""The import graph is a clean stack: no cycles, no arrow that climbs back up.

Every ``import`` of a ``kvshare_jax`` module counts, wherever it is (module level,
inside functions, under ``TYPE_CHECKING``). Floors follow docs/design.md's module map:
a module may import its own package's modules and modules on lower floors only.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    {"paths"},  # atomic writes, remote paths: under everything that writes files
    {
        "layout",
        "masks",
        "target",
        "sampling",
        "metrics",
        "data",
        "stats",
        "hf_export",
        "workdir_lock",
        "gpu_topology",
        "hbm_traffic",
        "preemption",
        "progress",
        "plotting",
        "prefill",
        "integrity",
        "tables",
        "kv_quant",
    },
    {"kernels", "cache_layout", "cells"},
    {"attention", "probes"},
    {"model"},
    {"config", "sharding", "decode", "hf_io", "flops"},
    {"checkpoint"},
    {"train", "convert", "lm_eval_adapter"},
    {"aot"},
    {"bench"},
    {"bench_report", "report"},
    {"study"},
    {"commands"},
    {"cli"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path, prefix: str = "kvshare_jax") -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(prefix)}
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the ``kvshare_jax`` modules it imports (packages count as modules)."""
    files = {_module_name(p): p for p in (ROOT / "kvshare_jax").rglob("*.py")}
    return {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_cycles():
    g, state, cycles = graph(), {}, []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        for v in sorted(g[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join([*stack[stack.index(v) :], v]))
            elif v not in state:
                visit(v, [*stack, v])
        state[u] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_every_module_has_a_floor():
    assert {_top(m) for m in graph()} - {""} <= set(FLOOR)


@pytest.mark.parametrize("module", sorted(graph()))
def test_no_upward_arrows(module):
    src = _top(module)
    if not src:
        return  # the package's __init__
    for dep in graph()[module]:
        dst = _top(dep)
        if not dst:
            continue  # the package itself (``from kvshare_jax import x``)
        assert dst == src or FLOOR[dst] < FLOOR[src], f"{module} imports {dep}"


def test_training_does_not_import_interop():
    assert not {"kvshare_jax.convert", "kvshare_jax.hf_io"} & graph()["kvshare_jax.train"]


def _loaded_after_import(module: str, prefix: str) -> str:
    """The modules named ``prefix...`` that importing ``module`` loads, in a fresh process."""
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({prefix!r})))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_checkpoint_imports_no_tensorflow_datasets():
    """TFDS (a second or more to import) loads only when a TFDS dataset is opened."""
    assert _loaded_after_import("kvshare_jax.checkpoint", "tensorflow") == "[]"


def test_model_imports_no_kernel():
    """The kernels load where they are first used (the attention dispatch, a model's
    matvec), not with the model."""
    assert _loaded_after_import("kvshare_jax.model", "kvshare_jax.kernels") == "[]"


# what an experiment may take from the commands: a command's flags, never a command
COMMAND_PARSERS = {
    "kvshare_jax.commands": {"parse_with_overrides"},
    "kvshare_jax.commands.bench": {"arg_parser", "spec_from_args"},
}


def test_experiments_import_only_command_parsers():
    for path in (ROOT / "experiments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("kvshare_jax.commands")]
                assert not names, f"{path.name} imports {names}"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "kvshare_jax.commands"
            ):
                taken = {a.name for a in node.names}
                allowed = COMMAND_PARSERS.get(node.module, set())
                assert taken <= allowed, f"{path.name} imports {taken - allowed} of {node.module}"


def test_only_commands_define_flags():
    """Command-line flags (argparse) live in ``commands/``; the library takes values."""
    for path in (ROOT / "kvshare_jax").rglob("*.py"):
        if "commands" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        calls = [
            n for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr in ("add_argument", "ArgumentParser")
        ]  # fmt: skip
        assert not calls and "argparse" not in _module_names(tree), path


def _module_names(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _sources() -> list[Path]:
    """The package's and the experiments' Python files."""
    return [
        *sorted((ROOT / "kvshare_jax").rglob("*.py")),
        *sorted((ROOT / "experiments").glob("*.py")),
    ]


def test_markdown_tables_come_from_the_table_helper():
    """Every markdown table is built by ``tables.markdown_table``: no separator row or
    cell join written anywhere else."""
    for path in _sources():
        if path != ROOT / "kvshare_jax" / "tables.py":
            text = path.read_text()
            assert "---|" not in text and "|---" not in text, path
            assert '" | ".join' not in text, path


# concept -> (its one module, the names only that module defines)
HOMES = {
    "prefill settings": ("prefill", {"Prefill", "check_passes", "parse_passes", "check_tol"}),
    "machine probes": ("probes", {"device_info", "cpu_model", "best_time", "read_bandwidth"}),
    "checkpoint integrity": (
        "integrity",
        {
            "write_checksums",
            "verify_checksums",
            "restore_newest_readable",
            "quarantine_newer",
            "save_error",
            "CheckpointSaveError",
            "UnreadableCheckpointError",
        },
    ),  # fmt: skip
    "study cells": ("cells", {"Cell"}),
    "markdown tables": ("tables", {"markdown_table"}),
    "command-line parsing": ("commands", {"ArgParser", "UsageError", "parse_with_overrides"}),
}
# the TPU launcher runs on a workstation with the standard library alone: its own parser
OWN_PARSER = {ROOT / "experiments" / "launch_tpu.py"}


@pytest.mark.parametrize("concept", sorted(HOMES))
def test_each_concept_has_one_home(concept):
    home, names = HOMES[concept]
    for path in _sources():
        tree = ast.parse(path.read_text())
        defined = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names
        }
        here = path.parent if path.name == "__init__.py" else path.with_suffix("")
        if concept == "command-line parsing" and path in OWN_PARSER:
            continue
        if here != ROOT / "kvshare_jax" / home:
            assert not defined, f"{path.relative_to(ROOT)} defines {defined} ({concept})"


def test_prefill_text_is_parsed_in_prefill_only():
    """The prefill flags' and fields' values reach ``Prefill.parse``; the default
    tolerance is written once."""
    for path in (ROOT / "kvshare_jax").rglob("*.py"):
        if path.name == "prefill.py":
            continue
        tree = ast.parse(path.read_text())
        tols = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == 1e-4]
        assert not tols, f"{path.relative_to(ROOT)} writes the prefill tolerance"
        for node in ast.walk(tree):  # no reading of the passes' text "m,b" or the modes
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Tuple)
                and {"auto", "exact"} <= {getattr(e, "value", None) for e in c.elts}
                for c in node.comparators
            ):
                raise AssertionError(f"{path.relative_to(ROOT)} parses the prefill modes")


def test_test_modules_do_not_import_each_other():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not set(names) & tests, f"{path.name} imports {set(names) & tests}"
