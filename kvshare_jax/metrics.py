"""Scalar metrics of a run: ``<workdir>/metrics.jsonl`` (one JSON object per write) and
TensorBoard event files under ``<workdir>/tensorboard`` (local or ``gs://`` workdirs)."""

from __future__ import annotations

import json
import math
from typing import Any

from etils import epath

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends ``{"step": s, name: value, ...}`` records; a no-op when not ``enabled``
    (every process but the first in a multi-process job)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imports torch if installed: ~2 s

        root = epath.Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self._path = root / METRICS_FILE
        # Object stores (gs://...) cannot append: keep the text, rewrite it on each write.
        self._text = None
        if "://" in workdir:
            self._text = self._path.read_text() if self._path.exists() else ""
        self._tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._text is None:
            with self._path.open("a") as f:
                f.write(line)
        else:
            self._text += line
            self._path.write_text(self._text)
        for name, value in metrics.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` in write order (empty if none)."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_metrics(workdir: str) -> dict[str, Any]:
    """The most recent value of every metric (``step`` = the last step written)."""
    out: dict[str, Any] = {}
    for record in read_metrics(workdir):
        out.update(record)
    return out
