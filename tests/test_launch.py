"""Cloud TPU launcher: --dry-run prints the exact gcloud commands."""

import pathlib
import shlex
import subprocess
import sys

REPO = "https://example.org/lab/kvshare_jax.git"
SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "launch_tpu.py"


def dry_run(*args):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--repo", REPO, *args],
        capture_output=True,
        text=True,
    )
    return out.returncode, [shlex.split(line) for line in out.stdout.splitlines()], out.stderr


def test_v4_8_single_host():
    rc, cmds, err = dry_run(
        "--name",
        "kv",
        "--zone",
        "us-central2-b",
        "--accelerator",
        "v4-8",
        "--",
        "kvshare",
        "train",
        "--config",
        "configs/llama_110m.py",
        "--workdir",
        "gs://b/run",
    )
    assert rc == 0, err
    create, install, run = cmds
    assert create == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "kv",
        "--zone=us-central2-b",
        "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ]
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kv"]
    assert "--worker=all" in install and "[tpu]" in install[-1] and REPO in install[-1]
    assert run[-1] == (
        "--command=cd kvshare_jax && .venv/bin/kvshare train --config "
        "configs/llama_110m.py --workdir gs://b/run --distributed"
    )


def test_v5e_32_multi_host_runs_same_command_on_all_workers():
    rc, cmds, err = dry_run(
        "--name",
        "pod",
        "--zone",
        "us-west4-a",
        "--accelerator",
        "v5litepod-32",
        "--project",
        "lab",
        "--spot",
        "--",
        "kvshare",
        "study",
        "--config",
        "configs/study/llama_110m.py",
        "--workdir",
        "gs://b/s",
    )
    assert rc == 0, err
    create, install, run = cmds
    assert "--accelerator-type=v5litepod-32" in create
    assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create
    assert "--project=lab" in create and "--project=lab" in run
    for cmd in (install, run):
        assert "--worker=all" in cmd
    assert run[-1].endswith(
        "kvshare study --config configs/study/llama_110m.py --workdir gs://b/s --distributed"
    )


def test_reuse_skips_create_and_bad_accelerator_errors():
    rc, cmds, _ = dry_run("--name", "kv", "--zone", "z", "--reuse")
    assert rc == 0 and len(cmds) == 2 and all(c[4] == "ssh" for c in cmds)
    rc, _, err = dry_run("--name", "kv", "--zone", "z", "--accelerator", "v9-8")
    assert rc != 0 and "unknown accelerator" in err
