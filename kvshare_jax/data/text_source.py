"""``TextSource``: the ``{"text": str}`` view every non-embedded data source returns.

Kept apart from ``tfds_text`` so that naming the type imports no TensorFlow Datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextSource:
    """Random-access view ``{"text": str}`` of a sequence of records holding text."""

    def __init__(self, records: Sequence[Any], text_key: str = "text"):
        self._records = records
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        text = self._records[index][self._text_key]
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)}

    def __repr__(self) -> str:
        return f"TextSource({self._records!r}, text_key={self._text_key!r})"
