"""Concatenate-and-chunk packing of token documents into fixed-length training rows.

The documents form one token stream. Row ``k`` holds stream tokens
``[k * seq_len, (k + 1) * seq_len]`` (``seq_len + 1`` tokens, so neighbouring rows
share one token): ``inputs = row[:-1]`` and ``targets = row[1:]``. Every token is an
input exactly once and every next-token pair is a target exactly once; nothing is
padded except the last row of a finite stream (``loss_mask`` 0 there).

``segments=True`` (``data.packing="segments"``) cuts the same rows from the same
stream and adds ``segment_ids [seq_len]`` (int32): the documents of a row, numbered
from 1 (0 on padding). A document's segment begins at the input that is the last
token of the document before it (its EOS, which then acts as BOS: the same (input,
target) pairs as "concat", so the loss counts the same tokens) and at the first input
of every row, so a document cut by a row boundary continues as a new segment of the
next row (positions restart there). The model then attends only within a segment, with
positions from 0 in each (docs/design.md §2).

The iterator state is the parent's state before the current document plus an offset
into it, so restoring re-reads (and re-tokenizes) one document, nothing more.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Packs 1-D int token arrays into ``{"inputs", "targets", "loss_mask"}`` rows."""

    def __init__(
        self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, segments: bool = False
    ):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._segments = segments

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(
            self._parent.__iter__(),
            seq_len=self._seq_len,
            pad_id=self._pad_id,
            segments=self._segments,
        )

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, segments={self._segments})"


class _PackIterator(grain.DatasetIterator):
    """Invariant: the parent is positioned after ``_doc``, or at ``_doc_state`` if no doc."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int, segments: bool):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._segments = segments
        self._doc_state = copy.deepcopy(parent.get_state())  # Parent state before `_doc`.
        self._doc: np.ndarray | None = None  # Current document, loaded lazily.
        self._pos = 0  # Offset in `_doc` of the next row's first token.

    def _next_doc(self) -> bool:
        """Loads the next document (or the one at ``_doc_state``); False at the end."""
        if self._doc is not None:
            self._doc_state = copy.deepcopy(self._parent.get_state())
            self._pos = 0
        try:
            self._doc = np.asarray(next(self._parent), dtype=np.int32)
        except StopIteration:
            self._doc = None
            return False
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        row = np.full(self._seq_len + 1, self._pad_id, dtype=np.int32)
        ends = np.zeros(self._seq_len + 1, dtype=bool)  # a document's last token
        filled = 0
        while filled < len(row):
            if (self._doc is None or self._pos == len(self._doc)) and not self._next_doc():
                break
            take = min(len(row) - filled, len(self._doc) - self._pos)
            row[filled : filled + take] = self._doc[self._pos : self._pos + take]
            filled += take
            self._pos += take
            if take:
                ends[filled - 1] = self._pos == len(self._doc)
        if filled < 2:  # Not even one (input, target) pair left.
            raise StopIteration
        if filled == len(row):
            self._pos -= 1  # The last token starts the next row.
        loss_mask = (np.arange(self._seq_len) < filled - 1).astype(np.float32)
        out = {"inputs": row[:-1], "targets": row[1:], "loss_mask": loss_mask}
        if self._segments:
            out["segment_ids"] = _segment_ids(ends[: self._seq_len], filled)
        return out

    def get_state(self) -> dict[str, Any]:  # (segment ids follow from the rows)
        return {"parent": copy.deepcopy(self._doc_state), "pos": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc_state = copy.deepcopy(state["parent"])
        self._doc = None
        self._pos = state["pos"]


def _segment_ids(ends: np.ndarray, filled: int) -> np.ndarray:
    """Segment ids of a row's inputs: a new segment at input 0 and at every input that
    ends a document (it starts the next one); 0 from ``filled`` on (padding)."""
    starts = ends.copy()
    starts[0] = True
    ids = np.cumsum(starts).astype(np.int32)
    ids[filled:] = 0
    return ids
