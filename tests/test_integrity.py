"""Workdir integrity: one trainer per workdir, checkpoint checksums, fallback when every
step is unreadable, metrics without duplicate steps, a full disk during a save."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainutil as tu
from etils import epath

from kvshare_jax import checkpoint, integrity, metrics, workdir_lock
from kvshare_jax import train as train_module
from kvshare_jax.commands import train as train_command
from kvshare_jax.train import train_and_evaluate


def train_argv(workdir: str, *overrides: str) -> list[str]:
    argv = [f"--config={tu.TINY_CONFIG}", f"--workdir={workdir}"]
    return argv + [f"--config.{o}" for o in tu.tiny_overrides(*overrides)]


def files_under(path: str) -> list[str]:
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def flip_bit(path: str, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        byte = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ the lock
def test_a_second_holder_fails_naming_host_and_pid(tmp_path):
    first = workdir_lock.WorkdirLock(str(tmp_path / "w"))
    first.acquire()
    record = json.loads((tmp_path / "w" / ".lock").read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(workdir_lock.WorkdirInUseError) as e:
        workdir_lock.WorkdirLock(str(tmp_path / "w")).acquire()
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    assert f"(since {record['started']})" in str(e.value)
    first.release()
    assert not (tmp_path / "w" / ".lock").exists()
    second = workdir_lock.WorkdirLock(str(tmp_path / "w"))
    second.acquire()  # free again
    second.release()


def test_a_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = {"host": socket.gethostname(), "pid": child.pid, "started": "x", "heartbeat": 1e12}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.acquire()  # a fresh heartbeat does not matter: the pid is gone
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_stale_only_after_the_heartbeat_timeout(tmp_path):
    record = {"host": "other-host", "pid": 1, "started": "then", "heartbeat": time.time()}
    (tmp_path / ".lock").write_text(json.dumps(record))
    with pytest.raises(workdir_lock.WorkdirInUseError, match="pid 1 on host other-host"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    record["heartbeat"] = time.time() - workdir_lock.STALE_S - 1
    (tmp_path / ".lock").write_text(json.dumps(record))
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == socket.gethostname()
    lock.release()


def test_the_heartbeat_refreshes_the_lock(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / ".lock").read_text())
    time.sleep(0.5)
    later = json.loads((tmp_path / ".lock").read_text())
    lock.release()
    assert later["heartbeat"] > first["heartbeat"]
    assert later["token"] == first["token"]  # the same holder


def test_the_lock_is_released_after_an_exception_and_a_new_dir_removed(tmp_path):
    workdir = str(tmp_path / "new" / "run")
    with pytest.raises(RuntimeError, match="boom"), workdir_lock.hold(workdir):
        assert os.path.exists(os.path.join(workdir, ".lock"))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # created for the lock only: removed again


def test_sigterm_releases_the_lock(tmp_path):
    code = (
        "import os, signal, sys, time\n"
        "from kvshare_jax import workdir_lock\n"
        f"with workdir_lock.hold({str(tmp_path)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=tu.subprocess_env()
    )
    assert child.stdout.readline().strip() == "held"
    assert (tmp_path / ".lock").exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (tmp_path / ".lock").exists()


def test_kvshare_train_on_a_workdir_in_use_fails_with_one_line(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    with workdir_lock.hold(workdir):
        assert train_command.run(train_argv(workdir)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith(f"kvshare train: error: workdir {workdir} is in use by pid {os.getpid()}")
    assert f"remove {workdir}/.lock if that process is gone" in err
    assert not os.path.exists(workdir)  # the second trainer wrote nothing, the first left


def test_train_and_evaluate_releases_the_lock_when_it_fails(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)

    def broken(*args):
        raise RuntimeError("trainer failed")

    monkeypatch.setattr(train_module, "Trainer", broken)
    with pytest.raises(RuntimeError, match="trainer failed"):
        train_and_evaluate(tu.tiny_config(), workdir)
    assert os.listdir(workdir) == []


# ------------------------------------------------------------------ checksums
class SmallState:
    """A Checkpointer over a ~100 KB state and a grain iterator (no model, no training)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def state(self, step: int) -> tuple[dict, dict]:
        params = {"w": jnp.arange(128 * 128, dtype=jnp.float32).reshape(128, 128) * step}
        return params, {"m": params["w"] + 1.0, "count": jnp.int32(step)}

    def iterator(self, position: int = 0):
        it = iter(grain.MapDataset.range(100).to_iter_dataset())
        for _ in range(position):
            next(it)
        return it

    def save(self, *steps: int) -> checkpoint.Checkpointer:
        ckpt = checkpoint.Checkpointer(self.workdir, max_to_keep=5)
        for step in steps:
            ckpt.save(step, *self.state(step), self.iterator(step))
        return ckpt

    def restore(self) -> tuple[int, dict, dict, int] | None:
        params, opt = self.state(1)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.device), (params, opt)
        )
        ckpt = checkpoint.Checkpointer(self.workdir, max_to_keep=5)
        it = self.iterator()
        try:
            found = ckpt.restore(*abstract, it)
        finally:
            ckpt.close()
        return None if found is None else (*found, next(it))

    def step_dir(self, step: int) -> str:
        return os.path.join(self.workdir, "checkpoints", str(step))


def test_every_saved_step_gets_a_manifest_before_close_returns(tmp_path):
    small = SmallState(str(tmp_path))
    small.save(1, 2).close()
    for step in (1, 2):
        manifest = json.loads(
            open(os.path.join(small.step_dir(step), integrity.CHECKSUM_FILE)).read()
        )
        listed = {os.path.join(small.step_dir(step), p) for p in manifest["crc32"]}
        on_disk = set(files_under(small.step_dir(step))) - {
            os.path.join(small.step_dir(step), integrity.CHECKSUM_FILE)
        }
        assert listed == on_disk
        for rel, (size, _) in manifest["crc32"].items():
            assert os.path.getsize(os.path.join(small.step_dir(step), rel)) == size
    step, params, opt_state, batch = small.restore()
    assert step == 2 and batch == 2
    np.testing.assert_array_equal(params["w"], small.state(2)[0]["w"])
    assert int(opt_state["count"]) == 2


def test_every_single_bit_flip_is_detected(tmp_path):
    """Flips one bit at a time (8 random positions in every file of a step, params and
    optimizer state) and checks the manifest catches each; restores the bit after."""
    small = SmallState(str(tmp_path))
    small.save(1).close()
    step_dir = epath.Path(small.step_dir(1))
    rng = random.Random(0)
    tried = detected = 0
    for path in files_under(small.step_dir(1)):
        if path.endswith(integrity.CHECKSUM_FILE):
            continue
        for bit in rng.sample(range(os.path.getsize(path) * 8), k=8):
            flip_bit(path, bit)
            tried += 1
            try:
                integrity.verify_checksums(step_dir)
            except integrity.CorruptCheckpointError as e:
                detected += 1
                assert os.path.relpath(path, small.step_dir(1)) in str(e)
            flip_bit(path, bit)
    assert integrity.verify_checksums(step_dir)
    print(f"single-bit flips: {tried} tried, {detected} detected")
    assert tried >= 8 * 8 and detected == tried


def test_a_flipped_bit_falls_back_to_the_previous_step(tmp_path, caplog):
    small = SmallState(str(tmp_path))
    small.save(1, 2).close()
    data = max(files_under(os.path.join(small.step_dir(2), "params")), key=os.path.getsize)
    flip_bit(data, 8 * 1000 + 3)
    with caplog.at_level(logging.WARNING):
        step, params, _, batch = small.restore()
    assert (step, batch) == (1, 1)
    np.testing.assert_array_equal(params["w"], small.state(1)[0]["w"])
    assert "checkpoint step 2 is unreadable (CorruptCheckpointError" in caplog.text
    assert os.path.basename(data) in caplog.text
    assert os.listdir(os.path.join(small.workdir, "checkpoints_corrupt")) == ["2"]


def test_a_step_without_manifest_is_restored_with_a_warning(tmp_path, caplog):
    small = SmallState(str(tmp_path))
    small.save(1, 2).close()
    os.remove(os.path.join(small.step_dir(2), integrity.CHECKSUM_FILE))
    with caplog.at_level(logging.WARNING):
        step, *_ = small.restore()
    assert step == 2
    assert f"checkpoint step 2 has no {integrity.CHECKSUM_FILE}" in caplog.text


def test_when_every_step_is_unreadable_nothing_is_moved(tmp_path):
    small = SmallState(str(tmp_path))
    small.save(1, 2).close()
    for step in (1, 2):
        flip_bit(max(files_under(small.step_dir(step)), key=os.path.getsize), 77)
    before = files_under(str(tmp_path))
    with pytest.raises(integrity.UnreadableCheckpointError) as e:
        small.restore()
    assert isinstance(e.value, ValueError)  # the CLI's one-line errors
    assert "can be restored (steps 2, 1; step 2: CorruptCheckpointError" in str(e.value)
    assert files_under(str(tmp_path)) == before


def test_kvshare_train_with_every_step_unreadable_is_one_line(tmp_path, capsys):
    workdir = tu.copy_run(tmp_path)
    for step in (100, 200):
        params = os.path.join(workdir, "checkpoints", str(step), "params")
        flip_bit(max(files_under(params), key=os.path.getsize), 12345)
    before = files_under(workdir)
    assert train_command.run(train_argv(workdir)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith(f"kvshare train: error: no checkpoint in {workdir}/checkpoints can be")
    assert files_under(workdir) == before  # nothing moved, no lock left
    with pytest.raises(integrity.UnreadableCheckpointError):
        checkpoint.open_model(workdir)


def test_open_model_checks_only_the_params_files(tmp_path, caplog):
    workdir = tu.copy_run(tmp_path)
    opt_file = max(files_under(os.path.join(workdir, "checkpoints", "200", "opt_state")))
    flip_bit(opt_file, 5)  # open_model reads no optimizer state: step 200 stays usable
    assert checkpoint.open_model(workdir).step == 200
    params = os.path.join(workdir, "checkpoints", "200", "params")
    flip_bit(max(files_under(params), key=os.path.getsize), 5)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.open_model(workdir).step == 100
    assert "checkpoint step 200 is unreadable (CorruptCheckpointError" in caplog.text


# -------------------------------------------------------------------- metrics
def test_read_metrics_skips_a_truncated_last_line(tmp_path, caplog):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        records = metrics.read_metrics(str(tmp_path))
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert f"skipping the unreadable last line of {path}" in caplog.text


def test_trim_metrics_drops_later_steps_and_broken_lines(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert metrics.trim_metrics(str(tmp_path), 2) == 1  # step 3 (the broken line: skipped)
    assert metrics.read_metrics(str(tmp_path)) == lines[:3]
    assert path.read_text().endswith("\n")
    assert metrics.trim_metrics(str(tmp_path), 2) == 0


def test_restart_without_checkpoints_says_so_and_repeats_no_step(tmp_path, capsys):
    workdir = tu.copy_run(tmp_path, keep_steps=())
    with open(os.path.join(workdir, metrics.METRICS_FILE), "a") as f:
        f.write('{"step": 250, "lo')  # killed mid-write
    train_and_evaluate(tu.tiny_config(), workdir)
    out = capsys.readouterr()
    assert f"{workdir} has no checkpoint: training from step 0 (dropped the" in out.out + out.err
    ours = metrics.read_metrics(workdir)
    reference = metrics.read_metrics(tu.reference_run())
    keys = [(r["step"], tuple(sorted(r))) for r in ours]
    assert len(keys) == len(set(keys))  # no step written twice
    # the same run again from step 0: the same records (but the timing)
    assert tu.without_timing(ours) == tu.without_timing(reference)


def test_fallback_resume_drops_the_lost_steps_metrics(tmp_path, capsys):
    workdir = tu.copy_run(tmp_path, keep_steps=(100,))
    train_and_evaluate(tu.tiny_config(), workdir)
    out = capsys.readouterr()
    assert "dropped the 2 records after step 100 from metrics.jsonl" in out.out + out.err
    reference = metrics.read_metrics(tu.reference_run())
    assert tu.without_timing(metrics.read_metrics(workdir)) == tu.without_timing(reference)


# ------------------------------------------------------------------ disk full
def test_a_save_hitting_the_file_size_limit_is_one_error_and_keeps_the_last_step(tmp_path):
    small = SmallState(str(tmp_path))
    small.save(1).close()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python ignores it
    ckpt = checkpoint.Checkpointer(small.workdir, max_to_keep=5)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # a 64 KB array fails
    try:
        with pytest.raises(integrity.CheckpointSaveError) as e:
            ckpt.save(2, *small.state(2), small.iterator(2))
            ckpt.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    ckpt.close()  # after a failure: releases, raises nothing more
    assert "saving checkpoint step 2" in str(e.value)
    assert "File too large" in str(e.value) and "step 1 is intact" in str(e.value)
    step, params, _, batch = small.restore()
    assert (step, batch) == (1, 1)
    np.testing.assert_array_equal(params["w"], small.state(1)[0]["w"])


def test_run_job_reports_a_failed_save_in_one_line(capsys):
    class Flags:
        coordinator_address, num_processes, process_id, distributed = "", 0, -1, False

    def job():
        raise integrity.CheckpointSaveError("saving checkpoint step 3 in w failed\n(disk)")

    assert train_command.run_job("kvshare train", Flags(), job) == 2
    assert (
        capsys.readouterr().err
        == "kvshare train: error: saving checkpoint step 3 in w failed (disk)\n"
    )


@pytest.mark.slow
def test_kvshare_train_on_a_full_disk_exits_2_and_resumes_exactly(tmp_path):
    workdir = tu.copy_run(tmp_path, keep_steps=(100,))  # trained to step 100, normal limits
    # writes past 64 KB fail with EFBIG (Python ignores SIGXFSZ); no fork of this process
    limited = ["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash", *tu.train_cmd(workdir)]
    full = subprocess.run(
        limited, env=tu.subprocess_env(), cwd=tu.ROOT, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 2, full.stderr
    err = one_error_line(full.stderr)
    assert "saving checkpoint step 200" in err and "File too large" in err
    assert "step 100 is intact" in err
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    assert checkpoint.open_model(workdir).step == 100
    resumed = tu.run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f"resuming {workdir} from step 100" in resumed.stderr + resumed.stdout
    _, params, opt_state, batch = tu.restore_newest(workdir)
    _, params_ref, opt_ref, batch_ref = tu.restore_newest(tu.reference_run())
    tu.assert_trees_equal(params, params_ref)
    tu.assert_trees_equal(opt_state, opt_ref)
    tu.assert_trees_equal(batch, batch_ref)
    reference = metrics.read_metrics(tu.reference_run())
    assert tu.without_timing(metrics.read_metrics(workdir)) == tu.without_timing(reference)


@pytest.mark.slow
def test_two_kvshare_train_processes_on_one_workdir(tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(
        tu.train_cmd(workdir),
        env=tu.subprocess_env(),
        cwd=tu.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 120
    while not os.path.exists(lock) and time.time() < deadline:
        time.sleep(0.1)
    second = tu.run_train(workdir)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2
    err = one_error_line(second.stderr)
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in err
    assert not os.path.exists(lock)
    tu.assert_trees_equal(tu.restore_newest(workdir)[1], tu.restore_newest(tu.reference_run())[1])
