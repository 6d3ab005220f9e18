"""Prefill settings: how the prompt's cyclic blocks iterate (docs/design.md §4, §5).

One value, :class:`Prefill` ``(passes, tol)``, with one parser and one set of rules for
the Python API, the command-line flags and the study config:

- ``passes``: ``(m, b)`` fixed iteration counts (``m + b >= t`` is exact for a
  ``t``-token prompt; also the text ``"m,b"``), ``"auto"`` (the default: until the
  upward KVs change by at most ``tol`` between passes, at most ``t`` passes, never fewer
  than the config's ``m + b`` unless a pass changes nothing) or ``"exact"`` (until they
  stop changing, at most ``t``: exact);
- ``tol``: only with ``"auto"`` (default :data:`DEFAULT_TOL`, max abs change).
"""

from __future__ import annotations

import dataclasses
import operator

MODES = ("auto", "exact")
Passes = tuple[int, int] | str  # (m, b) fixed iteration counts, or "auto" / "exact"
# "auto" stops once no upward K or V moves by more than this between passes: on every
# measured layout and prompt far more exact than the config's fixed 7 + 2 passes, at a
# fraction of "exact"'s cost (README "Adaptive prefill")
DEFAULT_TOL = 1e-4
NAMES = ("prefill_passes", "prefill_tol")  # the settings' names in the Python API


def check_passes(passes: object, what: str = "passes") -> tuple[int, int]:
    """``passes`` as ``(m, b)``; ``ValueError`` unless two integers with m >= 0, b >= 1
    (b = 0 would skip the cyclic blocks' layers altogether)."""
    try:
        m, b = (operator.index(p) for p in passes)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        m, b = -1, -1
    if m < 0 or b < 1:
        raise ValueError(f"{what} (m, b) needs two integers m >= 0 and b >= 1, got {passes!r}")
    return m, b


def parse_passes(passes: object, what: str = NAMES[0]) -> Passes:
    """``passes`` as ``(m, b)`` (see `check_passes`), ``"auto"`` or ``"exact"``, also from
    the text ``"m,b"``; ``ValueError`` otherwise (for a flag ``what``, in its terms)."""
    try:
        if not isinstance(passes, str):
            return check_passes(passes, what)
        text = passes.strip().lower()
        if text in MODES:
            return text
        parts = text.split(",")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return check_passes(tuple(int(p) for p in parts), what)
        raise ValueError(
            f"{what} (m, b) needs two integers m >= 0 and b >= 1 (or auto, exact), got {passes!r}"
        )
    except ValueError:
        if not what.startswith("--"):
            raise
        raise ValueError(
            f"{what} needs auto, exact or two numbers m,b (m >= 0, b >= 1), got {passes}"
        ) from None


def check_tol(tol: object, what: str = NAMES[1]) -> float:
    """A finite tolerance ``>= 0`` as a float; ``ValueError`` otherwise."""
    try:
        value = float(tol)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{what} must be a finite number >= 0, got {tol!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Prefill:
    """How prefill iterates the prompt's cyclic blocks (see the module docstring);
    hashable, so a generation program specialises on it. ``tol`` is None unless
    ``passes`` is ``"auto"``."""

    passes: Passes = "auto"
    tol: float | None = None  # None with "auto": DEFAULT_TOL

    def __post_init__(self):
        passes, tol = _checked(self.passes, self.tol, NAMES)
        object.__setattr__(self, "passes", passes)
        object.__setattr__(self, "tol", tol)

    @classmethod
    def parse(
        cls, passes: object = None, tol: object = None, names: tuple[str, str] = NAMES
    ) -> Prefill:
        """From command-line text (``"auto"``, ``"exact"``, ``"m,b"``; a number for
        ``tol``) or config values (``(m, b)`` too); None is "not given". ``names``: the
        two settings as the errors call them (flags, config fields)."""
        return cls(*_checked(passes, tol, names))

    def iteration(self) -> dict[str, Passes | float]:
        """``passes`` and ``tol`` as `decode.prefill` and `model.forward_hidden` take them
        (``"exact"`` stops at a fixed point whatever the tolerance)."""
        return {"passes": self.passes, "tol": self.tol or 0.0}


def _checked(passes: object, tol: object, names: tuple[str, str]) -> tuple[Passes, float | None]:
    """The one validation of a prefill setting: ``(passes, tol)`` normalised, or a
    one-line ``ValueError`` naming the setting as ``names`` spell it."""
    passes = "auto" if passes is None else parse_passes(passes, names[0])
    if tol is None:
        return passes, DEFAULT_TOL if passes == "auto" else None
    if passes != "auto":
        raise ValueError(f"{names[1]} needs {names[0]}=auto, got {names[0]}={_text(passes)}")
    return passes, check_tol(tol, names[1])


def _text(passes: Passes) -> str:
    return passes if isinstance(passes, str) else f"{passes[0]},{passes[1]}"


DEFAULT = Prefill()  # auto at DEFAULT_TOL: the decoder's, kvshare generate's and bench's
