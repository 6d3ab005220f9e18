"""Progress bars that also read well in log files.

:func:`bar` returns a normal ``tqdm`` bar when its stream is a terminal. Otherwise
(``nohup`` logs, CI) it returns a :class:`LogBar`, which prints one plain line every
``every`` updates instead of a carriage-return redraw after each one::

    with progress.bar(total=num_steps, initial=start, desc="train", every=log_every) as b:
        for step in range(start + 1, num_steps + 1):
            ...
            b.set_postfix(loss=f"{loss:.3f}")  # shown from the next line printed
            b.update(1)

``TQDM_DISABLE=1`` (tqdm's own variable) turns every bar off, in both modes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Protocol

import tqdm

_LINE = (
    "{desc}{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) "
    "[{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
_LINE_NO_TOTAL = "{desc}{n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
_FALSE = ("", "0", "false", "no")


class Progress(Protocol):
    """What callers may use of a bar: tqdm's and :class:`LogBar`'s common part."""

    n: int

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(
        self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any
    ) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


def disabled_by_env() -> bool:
    """Whether ``TQDM_DISABLE`` is set to a true value (``1``, ``true``, ...)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    every: int | None = None,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    file: IO[str] | None = None,
) -> Progress:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``) on ``file``
    (default stderr): tqdm on a terminal, else a :class:`LogBar` printing a line every
    ``every`` updates (default: a tenth of ``total``, or 100). ``disable`` (e.g. on all
    but the first process) or ``TQDM_DISABLE=1`` gives a bar that prints nothing."""
    stream = sys.stderr if file is None else file
    disable = disable or disabled_by_env()
    common = {"total": total, "desc": desc, "unit": unit, "initial": initial, "file": stream}
    if disable or _is_tty(stream):
        return tqdm.tqdm(iterable, disable=disable, **common)
    return LogBar(iterable, every=every, **common)


class LogBar:
    """A progress counter for logs: one plain line (count, percentage, elapsed<ETA, rate,
    postfix) each time the count passes a multiple of ``every``, when it reaches
    ``total``, and at :meth:`close` if it moved since the last line; nothing when closed
    by an exception. :meth:`set_postfix` only stores its values for the next line."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        every: int | None = None,
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
    ):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.unit = iterable, total, unit
        self.desc = f"{desc}: " if desc else ""
        self.every = max(1, int(every or (total // 10 if total else 100)))
        self.n = self.initial = self._shown = int(initial)
        self.postfix = ""
        self.file = file or sys.stderr
        self._start = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Adds ``n`` to the count; prints a line at a multiple of ``every`` or the total."""
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n == self.total:
            self._print()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        """Stores ``key=value`` pairs shown at the end of the next line (``refresh``
        is accepted for tqdm's signature; no line is printed)."""
        items = {**dict(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(
            f"{k}={tqdm.tqdm.format_num(v) if isinstance(v, int | float) else str(v).strip()}"
            for k, v in items.items()
        )

    def line(self) -> str:
        """The current line (without the newline)."""
        known = self.total is not None and self.n <= self.total
        return tqdm.tqdm.format_meter(
            self.n,
            self.total if known else None,
            time.monotonic() - self._start,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            initial=self.initial,
            bar_format=_LINE if known else _LINE_NO_TOTAL,
        )

    def _print(self) -> None:
        self.file.write(self.line() + "\n")
        self.file.flush()
        self._shown = self.n

    def close(self) -> None:
        """Prints a last line if the count moved since the last one (once)."""
        if not self._closed and self.n != self._shown:
            self._print()
        self._closed = True

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self._closed = True  # an error message follows: no line before it
        self.close()

    def __iter__(self) -> Iterator[Any]:
        """The items of ``iterable``, counting each once the caller is done with it."""
        if self.iterable is None:
            raise TypeError("LogBar: no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()
