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


class _SkippedFile:
    """Writes the node ids of skipped tests and modules (xfails excluded), one a line,
    to ``path`` at the end of the session: ``.ci/run`` runs them again once the extras
    are installed. Registered on the controller only, which gets every worker's reports
    under pytest-xdist."""

    def __init__(self, path: str):
        self.path, self.ids = path, {}

    def _record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.ids[report.nodeid] = None

    def pytest_runtest_logreport(self, report) -> None:
        self._record(report)

    def pytest_collectreport(self, report) -> None:  # a module skipped at import
        self._record(report)

    def pytest_sessionfinish(self) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(f"{nodeid}\n" for nodeid in sorted(self.ids))


def pytest_configure(config):
    """``KVSHARE_SKIPPED_FILE=PATH`` (opt-in): list the skipped tests in PATH."""
    path = os.environ.get("KVSHARE_SKIPPED_FILE")
    if path and not hasattr(config, "workerinput"):  # not on a pytest-xdist worker
        config.pluginmanager.register(_SkippedFile(path), "kvshare-skipped-file")
