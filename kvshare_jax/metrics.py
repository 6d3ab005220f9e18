"""Scalar metrics of a run: ``<workdir>/metrics.jsonl`` (one JSON object per write),
TensorBoard event files under ``<workdir>/tensorboard`` (local or ``gs://`` workdirs),
and, with a project name and the ``[wandb]`` extra, a Weights & Biases run (resumed
with the workdir: its id is kept in ``<workdir>/wandb_id``; ``WANDB_MODE=offline``
writes it locally).

A run that (re)starts from step ``s`` first drops the records of steps after ``s`` (work
that its checkpoints no longer hold) with :func:`trim_metrics`, so ``metrics.jsonl``
never repeats a step; the dropped records are not kept (TensorBoard still has them).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from absl import logging
from etils import epath

from kvshare_jax import paths

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends ``{"step": s, name: value, ...}`` records; a no-op when not ``enabled``
    (every process but the first in a multi-process job)."""

    def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = ""):
        self.enabled = enabled
        self._wandb = None
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
        if wandb_project:
            self._wandb = _wandb_run(root, wandb_project)

    def write_config(self, config: Any) -> None:
        """The run config as text in TensorBoard (and as the W&B run's config)."""
        if not self.enabled:
            return
        text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json") else str(config)
        self._tb.add_text("config", f"```\n{text}\n```", 0)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.config.update(json.loads(text), allow_val_change=True)

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
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _wandb_run(root: epath.Path, project: str) -> Any:
    """A W&B run of ``project``, the same one for every (re)start of the workdir."""
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"train.wandb_project={project!r} needs wandb: pip install -e '.[wandb]'"
        ) from None
    id_file = root / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    local = str(root) if "://" not in str(root) else None
    return wandb.init(project=project, id=run_id, resume="allow", dir=local)


def _parse(path: epath.Path) -> tuple[list[dict[str, Any]], int]:
    """``(records, number of unparsable lines)`` of a metrics file; each unparsable line
    (e.g. the last one of a run killed mid-write) is skipped with a warning."""
    records, bad = [], 0
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a {step: ...} record")
        except ValueError:
            where = "last line" if number == len(lines) else f"line {number}"
            logging.warning("skipping the unreadable %s of %s: %r", where, path, line[:80])
            bad += 1
            continue
        records.append(record)
    return records, bad


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` in write order (empty if none); an
    unreadable line (a truncated last line) is skipped with a warning naming the file."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return _parse(path)[0]


def trim_metrics(workdir: str, step: int) -> int:
    """Drops the records of steps after ``step`` and unreadable lines from
    ``<workdir>/metrics.jsonl`` (rewritten atomically); returns how many records
    were dropped."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return 0
    records, bad = _parse(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records) and not bad:
        return 0
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def latest_metrics(workdir: str) -> dict[str, Any]:
    """The most recent value of every metric (``step`` = the last step written)."""
    out: dict[str, Any] = {}
    for record in read_metrics(workdir):
        out.update(record)
    return out
