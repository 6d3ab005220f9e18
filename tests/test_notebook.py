"""The Colab quickstart notebook runs top to bottom on CPU (with tiny sizes injected
after its parameters cell, papermill-style)."""

from __future__ import annotations

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_quickstart.ipynb")
TINY_SIZES = """\
LAYOUT = "pizza-top:1"
NUM_LAYERS = 2
D_MODEL = 64
VOCAB_SIZE = 512
TOKENIZER_DOCS = 300
SEQ_LEN = 32
BATCH_SIZE = 4
TRAIN_STEPS = 4
GEN_TOKENS = 8
BENCH_BATCH_SIZES = (2,)
BENCH_GEN_LEN = 8
WORKDIR = {workdir!r}
"""


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_executes_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert "parameters" in nb.cells[first].metadata.get("tags", [])
    assert "git+{REPO_URL}" in nb.cells[first].source
    sizes = TINY_SIZES.format(workdir=str(tmp_path / "run"))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(sizes))

    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = "".join(_text(c) for c in nb.cells)
    assert "kv cache fraction: 1/2" in text  # the layout cell described pizza-top:1
    assert "eval_ppl" in text
    assert "The return statement ->" in text
    assert text.count("tok/s") >= 2  # standard and the layout
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the benchmark bars
    assert os.path.isdir(tmp_path / "run" / "checkpoints")
