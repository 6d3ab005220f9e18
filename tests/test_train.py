"""Training end to end on CPU: learning, exact resume (also after SIGKILL), CLI errors,
multi-process training."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import json
import math
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import jax
import numpy as np
import pytest
import trainutil as tu

from kvshare_jax import flops
from kvshare_jax.commands import eval as eval_command
from kvshare_jax.commands import train as train_command
from kvshare_jax.config import model_config_from
from kvshare_jax.data import Tokenizer, make_iterator, open_source
from kvshare_jax.metrics import latest_metrics, read_metrics
from kvshare_jax.train import train_and_evaluate


def unigram_entropy(config, num_batches: int = 200) -> float:
    """Entropy (nats) of the token frequencies of the first training batches."""
    tokenizer = Tokenizer.load(config.data.tokenizer_path)
    it = make_iterator(
        open_source(config.data, config.data.train_split),
        tokenizer,
        seq_len=config.train.seq_len,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
    )
    counts = collections.Counter()
    for _ in range(num_batches):
        batch = next(it)
        counts.update(batch["targets"][batch["loss_mask"] > 0].tolist())
    p = np.array(list(counts.values()), np.float64) / sum(counts.values())
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("layout", ["standard", "sandwich-middle:2"])
def test_tiny_run_beats_unigram_entropy(layout, tmp_path):
    if layout == "standard":
        workdir, config = tu.reference_run(), tu.tiny_config()
    else:  # 0_2_2_2: layer 1 reads layer 2's KVs, so layers 1..2 are iterated
        workdir, config = str(tmp_path), tu.tiny_config(f"model.layout={layout}")
        train_and_evaluate(config, workdir)
    final = latest_metrics(workdir)
    entropy = unigram_entropy(config)  # of the 200 x 8 x 32 tokens trained on
    assert final["step"] == 200
    # mean training loss of steps 101..200 (ln(512) = 6.24 at initialisation)
    assert final["loss"] < entropy - 0.3, (final, entropy)
    assert final["eval_loss"] < math.log(512) - 1, final


def test_segments_packing_trains_evaluates_and_counts_real_tokens(tmp_path):
    """``data.packing="segments"``: the batches carry segment ids, the run trains, eval
    uses the run's packing, and tokens/s counts the loss tokens (padding excluded: the
    train step reports them)."""
    from kvshare_jax.train import StepSpeed, Trainer

    config = tu.tiny_config(
        "data.packing=segments", "train.num_steps=3", "train.log_every=3",
        "train.eval_steps=1", "model.layout=pizza-top:2",
    )  # fmt: skip
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 3 and math.isfinite(final["eval_loss"])
    trainer = Trainer(config, str(tmp_path))
    batches = trainer.iterator(config.data.eval_split)
    batch = next(b for b in itertools.islice(batches, 50) if b["segment_ids"].max() > 1)
    assert batch["segment_ids"].shape == batch["inputs"].shape  # (a document boundary)
    # the loss with segment ids differs from the loss over concatenated rows
    state = trainer.init_state()
    with_ids = trainer.eval_step(state.params, batch)
    no_ids = trainer.eval_step(state.params, {k: v for k, v in batch.items() if k != "segment_ids"})
    assert float(with_ids[1]) == float(no_ids[1]) and float(with_ids[0]) != float(no_ids[0])
    # padding is not counted: a step whose batch holds 10 loss tokens reports 10
    speed = StepSpeed(trainer.cfg, 8, 32)
    speed.since = 0
    row = speed.since_flush(1, {1: {"tokens": np.float32(10)}})
    assert row["tokens_per_sec"] * row["step_time_s"] == pytest.approx(10)
    row = speed.since_flush(1)  # no counts: the whole batch
    assert row["tokens_per_sec"] * row["step_time_s"] == pytest.approx(8 * 32)


def _assert_ends_as_the_reference(workdir: str) -> dict:
    """The newest step of ``workdir`` is the reference run's last: params, optimizer
    state and next batch bitwise equal; returns that batch."""
    _, params_a, opt_a, batch_a = tu.restore_newest(tu.reference_run())
    step, params_b, opt_b, batch_b = tu.restore_newest(workdir)
    assert step == 200
    tu.assert_trees_equal(params_a, params_b)
    tu.assert_trees_equal(opt_a, opt_b)
    tu.assert_trees_equal(batch_a, batch_b)
    return batch_b


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    """A run killed (SIGKILL) after its step-100 checkpoint, then restarted, ends with
    the params, optimizer state and next batch of the uninterrupted run."""
    workdir = str(tmp_path / "run")
    half = os.path.join(workdir, "checkpoints", "100")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            tu.train_cmd(workdir),
            env=tu.subprocess_env(),
            cwd=tu.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not os.path.isdir(half) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.isdir(half), (tmp_path / "killed.log").read_text()
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "200")), "killed too late"

    resumed = tu.run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 100" in resumed.stdout
    batch_b = _assert_ends_as_the_reference(workdir)
    # ... and the saved data position is really "200 batches consumed"
    config = tu.tiny_config()
    fresh = make_iterator(
        open_source(config.data, "train"),
        Tokenizer.load(config.data.tokenizer_path),
        seq_len=32,
        batch_size=8,
        seed=0,
    )
    for _ in range(200):
        next(fresh)
    tu.assert_trees_equal(next(fresh), batch_b)


def _train_rows(workdir: str) -> list[dict]:
    """The logged training metrics but the timing."""
    return tu.without_timing([r for r in read_metrics(workdir) if "loss" in r])


def _sigterm_at_random(cmd, log_path, rng, env=None, count: int = 1, signals: int = 1):
    """Starts ``count`` trainers (``cmd``: one argv, or one per process), sends process 0
    ``signals`` SIGTERMs at a random moment once it trains; returns their exit statuses
    and logs. Process 0 writes to a terminal (a pty), so its bar shows every step."""
    master, terminal = pty.openpty()
    size = struct.pack("HHHH", 24, 160, 0, 0)  # rows, columns (tqdm draws no bar in 0)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, size)
    logs = [open(f"{log_path}.{i}", "w+") for i in range(count)]
    procs = [
        subprocess.Popen(c, env=env or tu.subprocess_env(), cwd=tu.ROOT,
                         stdout=terminal if i == 0 else f, stderr=subprocess.STDOUT)
        for i, (c, f) in enumerate(zip(cmd if count > 1 else [cmd], logs, strict=True))
    ]  # fmt: skip
    os.close(terminal)
    seen = []

    def read():  # the terminal's output, until process 0 exits
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 4096):
                seen.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while procs[0].poll() is None and time.monotonic() < deadline:  # until a step is done
        if re.search(r"train:.*\b[1-9]\d*/\d+", "".join(seen)):
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    for _ in range(signals):
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0.0, 0.2))
    codes = [p.wait(timeout=300) for p in procs]
    reader.join(timeout=10)
    os.close(master)
    return codes, ["".join(seen)] + [open(f"{log_path}.{i}").read() for i in range(1, count)]


@pytest.mark.parametrize("signals", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_saves_and_resumes_bitwise(tmp_path, signals):
    """SIGTERM at a random step: the trainer saves that step and exits 143; the same
    command resumes and ends with the params, optimizer state, next batch and logged
    metrics of the uninterrupted run. A second SIGTERM stops the save at once: the run
    resumes from the newest readable step, just as exactly."""
    rng = np.random.default_rng(int(time.time()))
    for attempt in range(4):  # a signal after the last step tests nothing: again
        workdir = str(tmp_path / f"run{attempt}")
        (code,), (log,) = _sigterm_at_random(
            tu.train_cmd(workdir), tmp_path / "log", rng, signals=signals
        )
        if code == 0:
            continue
        assert code == 143, log
        if signals == 1:
            saved = int(log.split("saved step ")[1].split(";")[0])
            assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved))), log
            print(f"SIGTERM: saved step {saved} (attempt {attempt})")
        break
    else:
        pytest.skip("the run finished before each SIGTERM")
    resumed = tu.run_train(workdir)
    assert resumed.returncode == 0, resumed.stderr
    if signals == 1:
        assert f"from step {saved}" in resumed.stdout + resumed.stderr
    _assert_ends_as_the_reference(workdir)
    if signals == 1:
        assert _train_rows(workdir) == _train_rows(tu.reference_run())


def test_rerun_of_finished_run_says_so(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(tu.reference_run(), workdir)
    argv = [f"--config={tu.TINY_CONFIG}", f"--workdir={workdir}"]
    argv += [f"--config.{o}" for o in tu.tiny_overrides()]
    assert train_command.run(argv) == 0
    assert "already trained to step 200" in capsys.readouterr().out


def test_eval_command_reports_the_final_eval_loss(capsys):
    workdir = tu.reference_run()
    assert eval_command.run([f"--workdir={workdir}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = read_metrics(workdir)[-1]
    assert result["step"] == 200
    assert result["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert result["eval_ppl"] == pytest.approx(math.exp(logged["eval_loss"]), rel=1e-6)
    # every document alone: other numbers from the same checkpoint over rows that cross
    # a document boundary (the validation documents are ~1.7k tokens long)
    out = {}
    for packing in ("concat", "segments"):
        argv = [f"--workdir={workdir}", "--json", "--eval-steps=16", f"--packing={packing}"]
        assert eval_command.run(argv) == 0
        out[packing] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["concat"]["eval_loss"] != out["segments"]["eval_loss"]
    assert abs(out["concat"]["eval_loss"] - out["segments"]["eval_loss"]) < 0.5


def test_metrics_file_has_train_and_eval_fields():
    records = read_metrics(tu.reference_run())
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == [100, 200]
    cfg = model_config_from(tu.tiny_config())
    executed = flops.executed_train_flops(cfg, 8, 32)  # the tiny run's batch and length
    for row in train_rows:  # no MFU on CPU: no peak FLOP/s known
        assert set(row) == {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s",
                            "tflops_per_device"}  # fmt: skip
        assert row["tokens_per_sec"] == pytest.approx(8 * 32 / row["step_time_s"])
        assert row["tflops_per_device"] == pytest.approx(executed / row["step_time_s"] / 1e12)
    assert set(records[-1]) == {"step", "eval_loss", "eval_ppl"}
    # cosine decay ends at learning_rate * min_lr_ratio after the last update
    assert train_rows[-1]["lr"] == pytest.approx(3e-4, rel=0.05)


def test_profile_trace_config_text_and_wandb_offline(tmp_path, monkeypatch):
    """train.profile_steps writes a jax.profiler trace; TensorBoard gets the config as
    text; train.wandb_project logs the scalars and the config to an (offline) W&B run,
    the same run when the workdir resumes; MFU is logged where a peak is known."""
    wandb = pytest.importorskip("wandb", reason="the [wandb] extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(flops, "peak_flops", lambda device: 1e12)  # as on an accelerator
    workdir = str(tmp_path / "run")
    overrides = ("train.num_steps=4", "train.log_every=2", "train.profile_steps=(2, 3)")
    config = tu.tiny_config(*overrides, "train.wandb_project=kvshare-test")
    train_and_evaluate(config, workdir)
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").rglob("*"))
    assert b"wandb_project" in events and b"profile_steps" in events  # the config text
    row = [r for r in read_metrics(workdir) if "loss" in r][-1]
    assert (
        0
        < row["mfu"]
        == pytest.approx(
            flops.model_train_flops(model_config_from(config), 8, 32) / row["step_time_s"] / 1e12
        )
    )
    run_id = (tmp_path / "run" / "wandb_id").read_text()
    (run,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    record = (run / f"run-{run_id}.wandb").read_bytes()  # (W&B's log of the run)
    assert b"wandb_project" in record and b"tflops_per_device" in record  # config, scalars
    config = tu.tiny_config(*overrides, "train.num_steps=6", "train.wandb_project=kvshare-test")
    train_and_evaluate(config, workdir)  # resumed: the same W&B run
    assert (tmp_path / "run" / "wandb_id").read_text() == run_id
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    del wandb


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.profile_steps=(5, 2)"], "train.profile_steps must be () or (a, b)"),
        (["model.layout=pizza-sideways:2"], "pizza-sideways"),
        (["train.seq_len=128"], "train.seq_len (128) exceeds model.max_len (64)"),
        (["train.grad_accum=3"], "not divisible by train.grad_accum (3)"),
        (["data.dataset=lm1b", "data.tfds_data_dir=/nonexistent/tfds"], "not prepared under"),
    ],
)
def test_bad_inputs_give_one_line_errors(overrides, message, tmp_path, capsys):
    argv = [f"--config={tu.TINY_CONFIG}", f"--workdir={tmp_path / 'run'}"]
    argv += [f"--config.{o}" for o in tu.tiny_overrides(*overrides)]
    assert train_command.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvshare train: error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_flags_and_config_file_are_usage_errors(tmp_path, capsys):
    assert train_command.run([f"--workdir={tmp_path}"]) == 2
    assert "--config" in capsys.readouterr().err
    assert train_command.run(["--config=/nonexistent.py", f"--workdir={tmp_path}"]) == 2
    assert "config file /nonexistent.py not found" in capsys.readouterr().err
    assert eval_command.run([f"--workdir={tmp_path}"]) == 2
    assert "not a training workdir" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_cmds(workdir: str, port: int, *overrides: str) -> list[list[str]]:
    job = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [tu.train_cmd(workdir, *overrides) + [*job, f"--process_id={i}"] for i in range(2)]


@pytest.mark.slow
def test_two_processes_sigterm_save_the_same_step_and_resume_bitwise(tmp_path):
    """2 processes: a SIGTERM to process 0 at a random step reaches both (JAX's
    preemption service), both save the same step and exit 143; resumed, the run ends as
    an uninterrupted two-process run."""
    overrides = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.num_steps=60")
    overrides += ("train.checkpoint_every=30", "train.log_every=10")
    env = tu.subprocess_env(devices=4)

    def run(workdir):
        procs = [subprocess.Popen(c, env=env, cwd=tu.ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for c in _two_process_cmds(workdir, _free_port(), *overrides)]  # fmt: skip
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)

    reference = str(tmp_path / "reference")
    run(reference)
    rng = np.random.default_rng(int(time.time()))
    workdir = str(tmp_path / "run")
    cmds = _two_process_cmds(workdir, _free_port(), *overrides)
    codes, logs = _sigterm_at_random(cmds, tmp_path / "log", rng, env=env, count=2)
    if codes == [0, 0]:
        pytest.skip("the run finished before the SIGTERM")
    assert codes == [143, 143], "\n".join(logs)
    saved = {int(log.split("saved step ")[1].split(";")[0]) for log in logs}
    assert len(saved) == 1, logs  # the same step on both
    print(f"SIGTERM to process 0: both saved step {saved.pop()} of 60")
    run(workdir)
    from kvshare_jax.checkpoint import open_model

    cfg, params_a, _, step_a = open_model(reference)
    _, params_b, _, step_b = open_model(workdir)
    assert step_a == step_b == 60
    tu.assert_trees_equal(params_a, params_b)
    assert _train_rows(workdir) == _train_rows(reference), saved


@pytest.mark.slow
def test_two_processes_train_and_one_process_restores(tmp_path):
    """2 processes x 4 CPU devices, mesh data=2 x fsdp=2 x tensor=2, per-process data."""
    from kvshare_jax.checkpoint import open_model

    workdir = str(tmp_path / "run")
    port = _free_port()
    overrides = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.num_steps=4")
    overrides += ("train.checkpoint_every=2", "train.log_every=2")
    procs = [
        subprocess.Popen(
            tu.train_cmd(workdir, *overrides)
            + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            env=tu.subprocess_env(devices=4),
            cwd=tu.ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    data_iter = os.path.join(workdir, "checkpoints", "4", "data_iter")
    for i in range(2):  # each process saved the position in its own data shard
        assert os.path.exists(os.path.join(data_iter, f"process_{i}-of-2.json"))
    cfg, params, tokenizer, step = open_model(workdir)
    assert step == 4 and cfg.vocab_size == tokenizer.vocab_size
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [2, 4]
