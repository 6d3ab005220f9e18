"""The grain input pipeline: documents -> shard -> shuffle -> tokenize -> pack -> batch.

Batches are ``{"inputs", "targets", "loss_mask"}`` of shape ``[batch_size, seq_len]``
(int32, int32, float32) with ``targets[:, t] == inputs[:, t + 1]`` inside a row and
``loss_mask`` 0 on padding; with ``packing="segments"`` also ``segment_ids`` (int32, the
documents of each row, see :mod:`kvshare_jax.data.packing`). The iterator is
checkpointable: ``get_state()`` / ``set_state()`` resume exactly, and
``checkpoint_args`` plugs it into orbax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from kvshare_jax.data.packing import PackIterDataset
from kvshare_jax.data.tokenizer import Tokenizer

PACKINGS = ("concat", "segments")  # data.packing

# Documents tokenized ahead of the packer, in background threads.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


class _Tokenize(grain.transforms.Map):
    """``{"text": str}`` -> int32 tokens of the text followed by EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, element: dict[str, str]) -> np.ndarray:
        ids = self._tokenizer.encode(element["text"])
        if self._tokenizer.eos_id >= 0:  # a tokenizer.json may define no EOS token
            ids.append(self._tokenizer.eos_id)
        return np.asarray(ids, dtype=np.int32)


def _pad_batch(batch_size: int):
    """Stacks rows and pads a short last batch with all-zero rows (``loss_mask`` 0)."""

    def batch_fn(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for key in rows[0]:
            stacked = np.stack([row[key] for row in rows])
            pad = np.zeros((batch_size - len(rows), *stacked.shape[1:]), stacked.dtype)
            out[key] = np.concatenate([stacked, pad])
        return out

    return batch_fn


def make_iterator(
    source: Any,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    packing: str = "concat",
) -> grain.DatasetIterator:
    """Returns an iterator of packed batches from this process's shard of ``source``.

    Args:
      source: random-access ``{"text": str}`` documents (``open_source``).
      tokenizer: the ``Tokenizer``; documents are tokenized lazily, EOS appended.
      seq_len: tokens per row (>= 2).
      batch_size: rows per batch, per process (>= 1).
      seed: shuffle seed in ``[0, 2**32)``; each epoch is shuffled differently.
      shard_index, shard_count: this process reads documents
        ``shard_index::shard_count`` (disjoint across processes, covering the source).
      num_epochs: passes over the shard; ``None`` repeats forever. A finite run ends
        with a padded row and a batch padded with zero rows.
      packing: ``"concat"`` (rows cut from the document stream) or ``"segments"`` (the
        same rows plus ``segment_ids``: attention stays inside each document).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if len(source) == 0:
        raise ValueError(f"source {source!r} is empty")
    docs = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(docs) == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} is empty: the source has only "
            f"{len(source)} documents"
        )
    ds = docs.shuffle(seed=seed).repeat(num_epochs).map(_Tokenize(tokenizer))
    rows = PackIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS),
        seq_len=seq_len,
        pad_id=tokenizer.pad_id,
        segments=packing == "segments",
    )
    return iter(rows.batch(batch_size, batch_fn=_pad_batch(batch_size)))


def checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False) -> Any:
    """Orbax args saving ``iterator``'s state (or restoring it in place) with grain's handler.

    Use as one item of ``ocp.args.Composite`` in a ``CheckpointManager``; each process
    writes its own ``process_<i>-of-<n>.json``.
    """
    args = grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave
    return args(iterator)
