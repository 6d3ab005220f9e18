"""Cloud TPU launcher (experiments/launch_tpu.py).

--dry-run prints every command; a fake ``gcloud`` (plus ``python3``/``curl``/``sudo``
stubs) on PATH runs the real launcher end to end against N local "workers" (one HOME
folder each): the real setup and run scripts unpack the shipped tarball, start the job
under nohup/setsid, copy the logs to a fake GCS, and a failing worker stops the others.
"""

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "experiments" / "launch_tpu.py"
TRAIN = ["kvshare", "train", "--config", "configs/llama_110m.py"]


def load_launcher():
    spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


launcher = load_launcher()


def launch(*args, env=None, timeout=60):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return out.returncode, out.stdout, out.stderr


def commands(stdout):
    """The command lines of a dry run (comments dropped), each split into argv."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def remote(cmd):
    """The remote shell command of a ``gcloud ... ssh ... --command=X``."""
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def test_single_host_dry_run_v5litepod_8():
    rc, out, err = launch(
        "--dry-run", "--name", "kv", "--zone", "us-west4-a", "--accelerator", "v5litepod-8",
        "--project", "my-lab-1", "--", *TRAIN, "--workdir", "runs/110m",
    )  # fmt: skip
    assert rc == 0, err
    assert "# v5litepod-8: 1 host(s), runtime v2-alpha-tpuv5-lite" in out
    create, describe, scp, setup, run, status = commands(out)
    where = ["--zone=us-west4-a", "--project=my-lab-1"]
    assert create == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "kv", *where,
        "--node-id=kv", "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite",
    ]  # fmt: skip
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "kv"]
    assert describe[-1] == "--format=value(state.state)"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5].endswith("kvshare_jax-kv.tar.gz") and scp[6] == "kv:~/kvshare_jax.tar.gz"
    assert "--worker=all" in scp and "--project=my-lab-1" in scp
    for cmd in (setup, run, status):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kv"]
        assert "--worker=all" in cmd and "--project=my-lab-1" in cmd
    # one host, local workdir: no --distributed, no GCS copy; no teardown unless asked
    assert "kvshare train --config configs/llama_110m.py --workdir runs/110m >" in remote(run)
    assert "--distributed" not in remote(run) and "gcloud storage cp" not in remote(run)
    assert "pack the working tree" in out and "delete" not in out


def test_multi_host_spot_dry_run_v5litepod_16():
    rc, out, err = launch(
        "--dry-run", "--name", "kv16", "--zone", "us-west4-a", "--accelerator", "v5litepod-16",
        "--spot", "--teardown", "--", *TRAIN, "--workdir", "gs://b/runs/110m",
    )  # fmt: skip
    assert rc == 0, err
    assert "# v5litepod-16: 4 host(s)" in out
    create, describe, scp, setup, run, status, delete = commands(out)
    assert create[3:6] == ["queued-resources", "create", "kv16"]
    assert create[-4:] == [
        "--node-id=kv16", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip
    assert "--worker=all" in scp and "--worker=all" in setup and "--worker=all" in run
    s = remote(setup)
    assert "tar -xzf $HOME/kvshare_jax.tar.gz -C $HOME/kvshare_jax" in s
    assert "uv venv --python 3.11 $HOME/kvshare_venv" in s and "-e '.[tpu]'" in s
    assert "git clone" not in s and "git pull" not in s  # ships the tree, not the origin
    r = remote(run)
    assert "nohup bash -c" in r and "setsid $HOME/kvshare_venv/bin/kvshare train" in r
    assert "--workdir gs://b/runs/110m --distributed > $HOME/kvshare_run/worker-$W.log" in r
    assert (
        "gcloud storage cp $HOME/kvshare_run/worker-$W.log gs://b/runs/110m/logs/worker-$W.log" in r
    )
    assert "kvshare-status" in remote(status)
    assert "# gcloud compute tpus tpu-vm ssh kv16" in out and "kill -TERM --" in out  # fail-fast
    assert delete == [
        "gcloud", "compute", "tpus", "queued-resources", "delete", "kv16",
        "--zone=us-west4-a", "--force", "--quiet",
    ]  # fmt: skip


def test_reserved_reuse_and_commit():
    rc, out, err = launch(
        "--dry-run", "--name", "kv", "--zone", "us-central2-b", "--accelerator", "v4-16",
        "--reserved", "--", *TRAIN, "--workdir=gs://b/r",
    )  # fmt: skip
    assert rc == 0, err
    assert commands(out)[0][-2:] == ["--runtime-version=tpu-ubuntu2204-base", "--reserved"]
    assert "v4-16: 2 host(s)" in out and "--distributed" in out
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rc, out, err = launch(
        "--dry-run", "--name", "kv", "--zone", "us-central2-b", "--accelerator", "v4-8",
        "--reuse", "--teardown", "--commit", "HEAD", "--", *TRAIN, "--workdir", "w",
    )  # fmt: skip
    assert rc == 0, err
    cmds = commands(out)
    assert cmds[0][:4] == ["git", "-C", str(ROOT), "archive"] and cmds[0][-1] == head
    assert not any("queued-resources" in c for c in cmds[:-1])  # --reuse: no request
    assert cmds[-1][3:6] == ["tpu-vm", "delete", "kv"]  # --reuse: teardown deletes the VM
    assert "pack the working tree" not in out


@pytest.mark.parametrize(
    "accelerator,hosts,runtime",
    [
        ("v2-8", 1, "tpu-ubuntu2204-base"),
        ("v3-32", 4, "tpu-ubuntu2204-base"),
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-16", 2, "tpu-ubuntu2204-base"),
        ("v5p-8", 1, "v2-alpha-tpuv5"),
        ("v5p-128", 16, "v2-alpha-tpuv5"),
        ("v5litepod-4", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", 64, "v2-alpha-tpuv5-lite"),
        ("v6e-1", 1, "v2-alpha-tpuv6e"),
        ("v6e-32", 8, "v2-alpha-tpuv6e"),
    ],
)
def test_accelerator_hosts_and_runtime(accelerator, hosts, runtime):
    s = launcher.parse_accelerator(accelerator)
    assert (s.hosts, s.runtime) == (hosts, runtime)


GOOD = ["--dry-run", "--name", "kv", "--zone", "us-west4-a"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--accelerator", "v9-8", "--", *TRAIN], "unknown accelerator 'v9-8'"),
        (["--accelerator", "v5litepod-12", "--", *TRAIN], "v5litepod sizes are 1, 4, 8"),
        (["--accelerator", "v5e-16", "--", *TRAIN], "Cloud TPU calls it v5litepod-16"),
        (["--accelerator", "v4-12", "--", *TRAIN], "multiples of 8"),
        (["--accelerator", "v4-8"], "missing command after '--'"),
        (["--accelerator", "v4-8", "--"], "missing command after '--'"),
        (["--accelerator", "v4-8", "--", "kvshare"], "missing kvshare subcommand"),
        (["--accelerator", "v4-8", "--", "python", "x.py"], "must start with 'kvshare'"),
        (["--accelerator", "v4-16", "--", *TRAIN, "--workdir", "runs/x"], "must be a gs://"),
        (["--accelerator", "v4-8", "--spot", "--reserved", "--", *TRAIN], "not allowed with"),
        (["--accelerator", "v4-8", "--python", "3.10", "--", *TRAIN], "3.11 or newer"),
        (["--accelerator", "v4-8", "--commit", "nosuchref", "--", *TRAIN], "unknown --commit"),
        (["--accelerator", "v4-8", "--reuse", "--spot", "--", *TRAIN], "not --reuse"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message):
    rc, out, err = launch(*GOOD, *args)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("launch_tpu.py: error: "), err
    assert message in err


@pytest.mark.parametrize("zone", ["us-central2", "US-CENTRAL2-B", "uscentral2b", "us-central2-bb"])
def test_bad_zone(zone):
    rc, _, err = launch("--dry-run", "--name", "kv", "--zone", zone, "--accelerator", "v4-8",
                        "--", *TRAIN)  # fmt: skip
    assert rc == 2 and len(err.splitlines()) == 1 and "bad --zone" in err


# ---------------------------------------------------------------- end to end, fake gcloud
FAKE_GCLOUD = r"""#!PYTHON
import os, pathlib, re, shutil, subprocess, sys
root = pathlib.Path(os.environ["FAKE_ROOT"])
argv = sys.argv[1:]
with open(root / "calls.txt", "a") as f:
    f.write(" ".join(argv) + "\n")
workers = [root / f"worker{i}" for i in range(int(os.environ["FAKE_WORKERS"]))]
if argv[:2] == ["storage", "cp"]:  # on a worker: gs://b/p -> FAKE_ROOT/gcs/b/p
    dst = root / "gcs" / argv[3].removeprefix("gs://")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(argv[2], dst)
elif argv[2:4] == ["queued-resources", "describe"]:
    print("ACTIVE")
elif argv[2:4] == ["tpu-vm", "scp"]:
    for w in workers:
        w.mkdir(exist_ok=True)
        shutil.copy(argv[4], w / argv[5].split(":~/")[1])
elif argv[2:4] == ["tpu-vm", "ssh"]:
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    rcs = []
    for i, w in enumerate(workers):
        env = dict(os.environ, HOME=str(w), FAKE_WORKER_ID=str(i))
        rcs.append(subprocess.run(["bash", "-c", command], env=env, cwd=w).returncode)
    sys.exit(max(rcs))
"""
FAKE_PYTHON3 = r"""#!/bin/bash
# python3 -m pip ... (no-op) | python3 -m uv venv --python V DIR | python3 -m uv pip ... (no-op)
if [ "$1 $2 $3" = "-m uv venv" ]; then
  mkdir -p "$6/bin" && ln -sf PYTHON "$6/bin/python" && cp "$FAKE_ROOT/kvshare" "$6/bin/kvshare"
fi
echo "python3 $*" >> "$FAKE_ROOT/python3.txt"
"""
FAKE_KVSHARE = r"""#!/bin/bash
echo "kvshare $* on worker $FAKE_WORKER_ID"
test -f pyproject.toml -a -f kvshare_jax/__init__.py || exit 9  # runs in the shipped tree
if [ "$FAKE_WORKER_ID" = "$FAKE_FAIL_WORKER" ]; then sleep 0.5; exit 3; fi
if [ -n "$FAKE_FAIL_WORKER" ]; then sleep 60; fi  # runs long unless stopped
"""


@pytest.fixture
def fake_cloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "gcloud": FAKE_GCLOUD.replace("PYTHON", sys.executable),
        "python3": FAKE_PYTHON3.replace("PYTHON", sys.executable),
        "curl": '#!/bin/bash\necho "$FAKE_WORKER_ID"\n',
        "sudo": '#!/bin/bash\necho "sudo $*" >> "$FAKE_ROOT/sudo.txt"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "kvshare").write_text(FAKE_KVSHARE)
    (tmp_path / "kvshare").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_ROOT=str(tmp_path))
    env["FAKE_WORKERS"] = "4"
    yield tmp_path, env
    for pid in tmp_path.glob("worker*/kvshare_run/pid"):  # never leave a job behind
        subprocess.run(["kill", "-KILL", "--", f"-{pid.read_text().strip()}"], capture_output=True)


LAUNCH_16 = [
    "--name", "kv16", "--zone", "us-west4-a", "--accelerator", "v5litepod-16", "--spot",
    "--teardown", "--poll", "0.2", "--", *TRAIN, "--workdir", "gs://b/run",
]  # fmt: skip


def test_end_to_end_success_with_fake_gcloud(fake_cloud):
    root, env = fake_cloud
    rc, out, err = launch(*LAUNCH_16, env=env)
    assert rc == 0, out + err
    calls = (root / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("compute tpus queued-resources create kv16")
    assert calls[-1].startswith("compute tpus queued-resources delete kv16")
    for i in range(4):
        w = root / f"worker{i}"
        assert (w / "kvshare_run" / "exit-code").read_text().strip() == "0"
        assert (w / "kvshare_jax" / "experiments" / "launch_tpu.py").is_file()  # the shipped tree
        log = (root / "gcs" / "b" / "run" / "logs" / f"worker-{i}.log").read_text()
        assert log == (
            "kvshare train --config configs/llama_110m.py --workdir gs://b/run "
            f"--distributed on worker {i}\n"
        )
    assert "uv venv --python 3.11" in (root / "python3.txt").read_text()
    assert "4/4 workers done" in out


def test_end_to_end_fail_fast_stops_other_workers_and_tears_down(fake_cloud):
    root, env = fake_cloud
    env["FAKE_FAIL_WORKER"] = "2"
    start = time.monotonic()
    rc, out, err = launch(*LAUNCH_16, env=env)
    assert time.monotonic() - start < 30  # the others sleep 60 s unless stopped
    assert rc == 3, out + err
    assert "worker 2 exited with status 3: stopping all" in out
    codes = [(root / f"worker{i}/kvshare_run/exit-code").read_text().strip() for i in range(4)]
    assert codes == ["143", "143", "3", "143"]  # SIGTERM'd by the watcher
    assert len(list((root / "gcs" / "b" / "run" / "logs").glob("worker-*.log"))) == 4
    calls = (root / "calls.txt").read_text().splitlines()
    assert calls[-1].startswith("compute tpus queued-resources delete kv16")
    assert any("kill -TERM" in c for c in calls)
