"""One trainer per workdir: an exclusive lock file ``<workdir>/.lock`` with a heartbeat.

``flock`` is unreliable on the shared filesystems workdirs live on (NFS, GCS-fuse), so
the lock is a file created only if absent, holding JSON ``{host, pid, started,
heartbeat, token}``. Locally it appears atomically and complete (written to a unique
temporary file, then ``os.link``-ed to ``.lock``, which fails if ``.lock`` exists);
on object stores (``gs://``), which have no create-if-absent through ``epath``, it is
written when absent and read back to check that this holder's token won. A daemon
thread refreshes ``heartbeat`` every ``HEARTBEAT_S`` seconds.

A lock is stale, and taken over, when its holder is on this host and its pid is not
alive, or when it is on another host and its heartbeat is older than ``STALE_S``.
(Neither orbax nor etils ships such a lock; ``filelock``'s ``SoftFileLease`` is close
but works on local paths only and is not a dependency of this package.)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class WorkdirInUseError(ValueError):
    """Another live trainer holds the workdir (one line, exit status 2 in the CLI)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class WorkdirLock:
    """The exclusive lock of ``workdir`` (see the module docstring); ``acquire`` raises
    :class:`WorkdirInUseError` naming the holder, ``release`` removes the lock file."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.workdir = workdir
        self.path = epath.Path(workdir) / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record: dict[str, Any] | None = None
        self._made: list[epath.Path] = []  # directories the lock created, deepest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- file access
    def _read(self) -> dict[str, Any] | None:
        """The lock's record; None when there is no lock; ``{}`` when unparsable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self, record: dict[str, Any]) -> bool:
        """Writes ``record`` as the lock if there is none; True when this call created it."""
        text = json.dumps(record, sort_keys=True) + "\n"
        if "://" in self.workdir:
            if self.path.exists():
                return False
            self.path.write_text(text)
            return (self._read() or {}).get("token") == record["token"]
        tmp = self.path.parent / f"{LOCK_FILE}.{record['token']}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # atomic, fails if the lock exists (NFS-safe)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _replace(self, record: dict[str, Any]) -> None:
        """Rewrites the lock (this holder's) atomically."""
        tmp = self.path.parent / f"{LOCK_FILE}.{record['token']}.tmp"
        tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
        tmp.replace(self.path)

    # ------------------------------------------------------------- staleness
    def _stale(self, record: dict[str, Any]) -> bool:
        """Whether ``record``'s holder is gone (see the module docstring)."""
        host, pid = record.get("host"), record.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            return not _pid_alive(pid)
        heartbeat = record.get("heartbeat")
        if not isinstance(heartbeat, (int, float)):  # unparsable (half-written): file age
            try:
                heartbeat = self.path.stat().mtime
            except FileNotFoundError:
                return True
        return time.time() - float(heartbeat) > self.stale_s

    def _in_use_message(self, record: dict[str, Any]) -> str:
        holder = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
        return (
            f"workdir {self.workdir} is in use by {holder} (since {record.get('started', '?')}); "
            f"wait for it or remove {self.path} if that process is gone"
        )

    # ------------------------------------------------------------- public
    def acquire(self) -> None:
        """Takes the lock (creating ``workdir``), taking over a stale one, and starts the
        heartbeat; :class:`WorkdirInUseError` when a live trainer holds it."""
        self._made = []  # removed again when left empty
        missing = self.path.parent
        while not missing.exists() and missing != missing.parent:
            self._made.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        for _ in range(5):
            if self._create(record):
                break
            held = self._read()
            if held is None:  # released meanwhile
                continue
            if not self._stale(held):
                raise WorkdirInUseError(self._in_use_message(held))
            # remove the stale lock only if it is still the one judged stale
            if self._read() == held:
                logging.warning("taking over the stale lock of %s: %s", self.workdir, held)
                self.path.unlink(missing_ok=True)
        else:
            raise WorkdirInUseError(self._in_use_message(self._read() or {}))
        self.record = record
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name="kvshare-workdir-lock", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("token") != self.record["token"]:
                    logging.error("the lock of %s was taken by another process", self.workdir)
                    return
                self.record = {**self.record, "heartbeat": time.time()}
                self._replace(self.record)
            except OSError as e:  # a transient filesystem error: try again next beat
                logging.warning("cannot refresh the lock of %s: %s", self.workdir, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still this holder's."""
        if self.record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)
            for made in self._made:  # a run that failed before writing anything
                if any(made.iterdir()):
                    break
                made.rmdir()
        except OSError as e:
            logging.warning("cannot remove the lock %s: %s", self.path, e)
        self.record = None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock]:
    """Holds the lock of ``workdir`` for the block: taken by the first process of a job
    (the others learn whether it succeeded and trust it) and released on any exit:
    exceptions, ``KeyboardInterrupt``, and SIGTERM, which becomes ``SystemExit(143)``
    while held unless the program installed its own handler. (In a multi-process job
    JAX's preemption service owns SIGTERM: :mod:`kvshare_jax.preemption`.)"""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            error = e
    if jax.process_count() > 1:
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not taken and error is None:
            error = WorkdirInUseError(f"workdir {workdir} is in use (see process 0's error)")
    if error is not None:
        raise error
    previous = None
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield lock
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()
