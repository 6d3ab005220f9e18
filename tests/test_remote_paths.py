"""Remote workdirs: reports, results and figures go through ``etils.epath`` to ``gs://``
paths (here an in-memory fsspec filesystem standing in for GCS, no network), and a
``gs://`` path without gcsfs is one line naming the extra."""

import importlib
import importlib.util
import os

import fsspec
import pytest
import trainutil as tu
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from kvshare_jax import bench_report, paths, study
from kvshare_jax.cli import main
from kvshare_jax.config import check_output_dir, load_config

fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not its dict


class FakeGCS(MemoryFileSystem):
    """GCS as a process-local in-memory store (own store, not memory://'s)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
    saved = {p: fsspec_registry.registry.get(p) for p in ("gs", "gcs")}
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    # gcsfs itself is not installed here: the fake serves gs://
    monkeypatch.setitem(paths._FILESYSTEMS, "gs", ("fsspec", "gcs"))
    yield
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    for protocol, cls in saved.items():
        if cls is None:
            fsspec_registry._registry.pop(protocol, None)  # back to the gcsfs import hint
        else:
            fsspec.register_implementation(protocol, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _no_local_uri_dirs():
    assert not os.path.exists("gs:"), "a gs:// path was written as a local directory"


def test_study_results_report_and_figures_go_to_gcs(fake_gcs):
    config = load_config(
        os.path.join(tu.ROOT, "configs", "study", "cpu.py"),
        ("study.layouts=('standard','pizza-bottom')",),
    )
    cells = study.plan_cells(config)
    results = {c.trained: tu.fake_study_result(c, 20.0, 100.0) for c in cells}
    workdir = "gs://bucket/study"
    out, written = study.write_results(config, cells, results, workdir)
    names = sorted(p.name for p in epath.Path(workdir).iterdir())
    assert names == ["kv_layers.png", "report.md", "results.json", "throughput_vs_ppl.png"]
    assert paths.read_json(f"{workdir}/results.json")["rows"] == out["rows"]
    assert "| pizza-bottom |" in epath.Path(f"{workdir}/report.md").read_text()
    assert all(w.startswith("gs://bucket/study/") for w in written)
    _no_local_uri_dirs()


def test_bench_reports_go_to_gcs(fake_gcs):
    results = paths.read_json(os.path.join(tu.ROOT, "experiments/results/throughput_cpu.json"))
    written = bench_report.write_reports(results, "gs://bucket/bench", "t")
    assert paths.read_json(written["json"]) == results
    assert epath.Path(written["md"]).read_text() == bench_report.markdown(results)
    assert epath.Path(written["png"]).read_bytes()[:4] == b"\x89PNG"
    _no_local_uri_dirs()


def test_output_dir_checks_work_on_gcs(fake_gcs):
    paths.write_text("gs://bucket/a_file", "x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir("gs://bucket/a_file", "workdir")
    check_output_dir("gs://bucket/new/run", "workdir")  # absent: fine, nothing created
    assert not epath.Path("gs://bucket/new").exists()


def test_gcs_path_without_gcsfs_names_the_extra(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gcsfs" else real(n, *a)
    )
    argv = ["train", "--config", tu.TINY_CONFIG, "--workdir", "gs://bucket/run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'kvshare_jax[gcs]'" in err
    _no_local_uri_dirs()
