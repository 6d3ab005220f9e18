"""The Colab quickstart notebook: its install, runtime and workdir cells on their own
(fast), and the whole notebook executed top to bottom on CPU at its shipped sizes (what
a free Colab CPU runtime runs; its wall time is the one the notebook's intro states)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

from kvshare_jax.metrics import read_metrics

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_quickstart.ipynb")
FIXED_OLD_WORKDIR = "/tmp/kvshare_quickstart"  # what the notebook used to write to


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, tag: str):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def _run_cells(*tags: str, **overrides) -> dict:
    """Executes the tagged code cells in one namespace, after the parameters cell and
    ``overrides`` (as papermill would inject them)."""
    nb = _notebook()
    ns: dict = {"__name__": "__notebook__"}
    exec(_cell(nb, "parameters").source, ns)
    ns.update(overrides)
    for tag in tags:
        exec(_cell(nb, tag).source, ns)
    return ns


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


# ------------------------------------------------------------------ install cell
def test_install_cell_raises_when_pip_fails(tmp_path):
    broken = tmp_path / "broken_checkout"
    broken.mkdir()
    (broken / "pyproject.toml").write_text('[project]\nname = "kvshare_jax"\nversion = \n')
    with pytest.raises(RuntimeError, match="pip install .* failed") as info:
        _run_cells("install", KVSHARE_SOURCE=str(broken))
    pip = info.value.__cause__
    assert isinstance(pip, subprocess.CalledProcessError) and pip.returncode != 0
    assert "TOML" in pip.stderr and pip.stderr[-200:] in str(info.value)  # pip's error shown


def test_install_cell_skips_pip_for_this_checkout(monkeypatch, capsys, tmp_path):
    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.chdir(os.path.join(ROOT, "experiments"))  # where Jupyter starts the kernel
    ns = _run_cells("install")  # KVSHARE_SOURCE "" -> the checkout above
    assert ns["find_checkout"]() == ROOT
    assert "no pip install" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # no checkout, no wheel: a loud error, not a silent skip
    with pytest.raises(FileNotFoundError, match="KVSHARE_SOURCE"):
        ns["resolve_source"]("")
    (tmp_path / "kvshare_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
    assert ns["resolve_source"]("") == "kvshare_jax-0.1.0-py3-none-any.whl"


# ------------------------------------------------------------ runtime and workdir
def test_runtime_cell_names_the_devices(capsys):
    _run_cells("runtime", sys=sys)  # imported by the install cell
    out = capsys.readouterr().out
    assert "runtime: CPU (not Colab)" in out
    assert "devices: [CpuDevice(id=0)" in out


def test_workdir_is_fresh_or_on_drive(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ns = _run_cells("workdir", IN_COLAB=False, os=os)
    assert ns["USE_DRIVE"] is False
    first, second = ns["WORKDIR"], ns["make_workdir"](False, "x", False)
    assert first != second and first != FIXED_OLD_WORKDIR
    assert os.path.dirname(first) == str(tmp_path) and os.listdir(first) == []
    # outside Colab the Drive option falls back (with a note) instead of failing
    assert os.path.dirname(ns["make_workdir"](True, "x", False)) == str(tmp_path)
    assert "USE_DRIVE needs a Colab runtime" in capsys.readouterr().out

    mounted = []
    drive = types.SimpleNamespace(mount=lambda root: mounted.append(root))
    colab = types.ModuleType("google.colab")
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    root = tmp_path / "drive"
    path = ns["make_workdir"](True, "run1", True, drive_root=str(root))
    assert mounted == [str(root)]
    assert path == str(root / "MyDrive" / "kvshare_runs" / "run1") and os.path.isdir(path)


# ------------------------------------------------------------------ the notebook
def test_quickstart_notebook_executes_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # so the fresh workdir lands here
    nb = _notebook()
    client = nbclient.NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},  # as Jupyter/Colab
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    out = {tag: _text(_cell(nb, tag)) for tag in ("install", "runtime", "workdir", "wall_time")}
    text = "".join(_text(c) for c in nb.cells)

    assert "no pip install" in out["install"]  # the test environment has it installed
    assert "runtime: CPU (not Colab)" in out["runtime"] and "CpuDevice" in out["runtime"]
    workdir = re.search(r"workdir: (\S+)", out["workdir"]).group(1)
    assert os.path.dirname(workdir) == str(tmp_path)  # fresh, not a fixed /tmp path
    assert os.path.isdir(os.path.join(workdir, "checkpoints"))

    # training: the loss falls (the logged metrics, as the loss-curve cell read them)
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.5, losses
    assert "eval_ppl" in text and "The return statement ->" in text

    # the benchmark plot: standard vs the half-KV layout, more sequences fit the budget
    nb_params = {}
    exec(_cell(nb, "parameters").source, nb_params)
    layout, layers = nb_params["LAYOUT"], nb_params["NUM_LAYERS"]
    plot = json.loads(re.search(r"plot data: (.*)", text).group(1))
    assert list(plot) == ["standard", layout]
    assert plot["standard"]["kv_layers"] == layers and plot[layout]["kv_layers"] == layers // 2
    assert plot[layout]["max_batch"] > plot["standard"]["max_batch"] > 0
    assert all(row["decode_tok_s"] > 0 for row in plot.values())
    with open(os.path.join(workdir, "bench.json")) as f:
        saved = {r["layout"]: r["max_batch"] for r in json.load(f)["rows"]}
    assert saved == {name: row["max_batch"] for name, row in plot.items()}
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the benchmark bars

    # wall time: recorded by the notebook, consistent with this test's own clock
    found = re.search(r"notebook wall time: ([0-9.]+) s, CPU time ([0-9.]+) s", out["wall_time"])
    wall, cpu = float(found.group(1)), float(found.group(2))
    with open(os.path.join(workdir, "wall_time.json")) as f:
        saved = json.load(f)
    assert saved["wall_s"] == pytest.approx(wall, abs=0.05) and saved["colab"] is False
    assert 0.6 * elapsed < wall <= elapsed and cpu > 0
    print(f"notebook wall time {wall:.1f} s, CPU {cpu:.1f} s; nbclient {elapsed:.1f} s")
