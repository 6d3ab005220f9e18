"""The ``KVSHARE_SKIPPED_FILE`` hook of ``conftest.py`` that ``.ci/run`` relies on: the
node ids of every skipped test and module, collected on the pytest-xdist controller."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

DEMO = """
import pytest

def test_runs():
    pass

@pytest.mark.skip(reason="marked")
def test_marked():
    pass

@pytest.mark.parametrize("arg", ["a b"])
def test_inside(arg):
    pytest.skip("inside the test")

@pytest.mark.xfail(reason="an expected failure is no skip")
def test_xfail():
    assert False
"""


def _run(tmp_path: Path, *args: str) -> list[str]:
    (tmp_path / "test_demo.py").write_text(textwrap.dedent(DEMO))
    (tmp_path / "test_gone.py").write_text("import pytest\npytest.importorskip('no_such_mod')\n")
    listing = tmp_path / "skipped.txt"
    env = {**os.environ, "KVSHARE_SKIPPED_FILE": str(listing), "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider"]
    cmd += ["-c", os.devnull, "--rootdir", str(tmp_path), *args, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return listing.read_text().splitlines()


def test_skipped_file_lists_skips_under_xdist(tmp_path):
    expected = ["test_demo.py::test_inside[a b]", "test_demo.py::test_marked", "test_gone.py"]
    assert _run(tmp_path, "-n", "2") == expected
