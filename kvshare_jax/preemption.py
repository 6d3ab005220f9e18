"""Save on preemption: a SIGTERM (the notice spot/preemptible VMs get) makes the trainer
save at a step every process agrees on, then exit with status 143.

One process: the first SIGTERM sets a flag and the next step saves; a second SIGTERM
stops at once (``SystemExit(143)``; the checkpointer's fallback keeps the newest readable
step). Several processes (``jax.distributed``): JAX's preemption service owns SIGTERM, a
notice to any process reaches all, and ``reached_preemption_sync_point`` names the same
step on each (what MaxText does). (With that service turned off,
``jax_enable_preemption_service=False``, each process only sees its own notice: send it
to every process.)
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from etils import epath

from kvshare_jax import paths

EXIT_STATUS = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM
PENDING_FILE = "preempted.json"  # per-step metrics not yet logged, at the saved step


class PreemptedError(Exception):
    """The run was preempted and saved at ``step``; the same command resumes it."""

    def __init__(self, step: int):
        super().__init__(
            f"preempted (SIGTERM): saved step {step}; re-run the same command to resume"
        )
        self.step = step


class Guard:
    """``with Guard() as guard: ... if guard.reached(step): save and stop``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Guard:
        from jax._src import distributed

        self._jax = jax.process_count() > 1 and (
            distributed.global_state.preemption_sync_manager is not None
        )
        if not self._jax and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second notice: stop now
            raise SystemExit(128 + signum)
        self.requested = True
        logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")

    def reached(self, step: int) -> bool:
        """Whether to save at ``step`` and stop (the same answer on every process; call
        it at every step)."""
        if self._jax:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def save_pending(workdir: str, step: int, records: dict[int, dict[str, Any]]) -> None:
    """Keeps the per-step metrics of the steps not yet logged at the preemption save, so
    the resumed run logs the means an uninterrupted run would (first process only)."""
    rows = {str(s): {k: float(v) for k, v in r.items()} for s, r in records.items()}
    paths.write_json(epath.Path(workdir) / PENDING_FILE, {"step": step, "records": rows})


def load_pending(workdir: str, step: int) -> dict[int, dict[str, np.ndarray]]:
    """The metrics :func:`save_pending` kept at ``step`` (float32, as the device gave
    them); empty when the run resumes from another step."""
    path = epath.Path(workdir) / PENDING_FILE
    if not path.exists():
        return {}
    kept = json.loads(path.read_text())
    if kept.get("step") != step:
        return {}
    return {int(s): {k: np.float32(v) for k, v in r.items()} for s, r in kept["records"].items()}
