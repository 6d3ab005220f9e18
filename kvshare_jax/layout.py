"""Static layer-to-KV mappings (layouts) for cross-layer KV sharing.

A layout of ``L`` layers is a tuple ``targets`` where ``targets[i] = j`` means the
queries of layer ``i`` attend to the keys/values computed by layer ``j``. The string
form is the reference implementation's ``layer_types``: ``"0_6_6_6_6_6_6_7"``, with an
``s`` suffix marking a sliding-window layer (``"0s_1s_2_2"``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

PARTS = ("pizza", "sandwich", "lasagna")
POSITIONS = ("bottom", "top", "middle")
STANDARD = "standard"
PRESETS = tuple(f"{p}-{q}" for p in PARTS for q in POSITIONS)  # the nine, without ':l'


def preset_specs(num_kv_layers: int) -> list[str]:
    """``standard`` and the nine presets at ``num_kv_layers`` KV layers: the layouts
    the paper compares, as ``from_spec`` strings."""
    return [STANDARD, *(f"{p}:{num_kv_layers}" for p in PRESETS)]


def mapping_length(spec: str) -> int | None:
    """Layers spelled by a mapping string (``"0_1_1"`` -> 3); None for a named layout,
    whose layer count must be given."""
    spec = spec.strip()
    return len(spec.split("_")) if _looks_like_mapping(spec) else None


def _looks_like_mapping(spec: str) -> bool:
    """Digits (any script), ``-``, ``s`` and ``_`` only: meant as a mapping string, so
    :meth:`KVLayout.parse` names the layer it cannot read."""
    return re.fullmatch(r"[-\ds_]+", spec) is not None


@dataclasses.dataclass(frozen=True)
class CyclicBlock:
    """Contiguous layers ``start..end`` (inclusive) linked by upward targets."""

    start: int
    end: int

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """A validated, hashable layer-to-KV mapping (usable as a static jit argument)."""

    targets: tuple[int, ...]
    sliding: tuple[bool, ...] = ()

    def __post_init__(self):
        targets = tuple(int(t) for t in self.targets)
        sliding = tuple(bool(s) for s in self.sliding) or (False,) * len(targets)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "sliding", sliding)
        n = len(targets)
        if n == 0:
            raise ValueError("layout must have at least one layer")
        if len(sliding) != n:
            raise ValueError(f"sliding flags have length {len(sliding)}, expected {n}")
        for i, t in enumerate(targets):
            if not 0 <= t < n:
                raise ValueError(f"layer {i}: target {t} is out of range [0, {n})")
        for i, t in enumerate(targets):
            if targets[t] != t:
                raise ValueError(
                    f"layer {i}: target {t} is not a KV layer "
                    f"(layer {t} targets {targets[t]}, a KV layer must target itself)"
                )

    # ----------------------------------------------------------------- forms
    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> KVLayout:
        """Parses the string form ``"0_6_6_7"`` (``s`` suffix = sliding window)."""
        parts = text.strip().split("_")
        targets, sliding = [], []
        for i, p in enumerate(parts):
            m = re.fullmatch(r"([0-9]+)(s?)", p)
            if m is None:
                raise ValueError(f"layer {i}: cannot parse {p!r} in layout {text!r}")
            targets.append(int(m.group(1)))
            sliding.append(m.group(2) == "s")
        if num_layers is not None and len(targets) != num_layers:
            raise ValueError(f"layout {text!r} has {len(targets)} layers, expected {num_layers}")
        return cls(tuple(targets), tuple(sliding))

    def __str__(self) -> str:
        pairs = zip(self.targets, self.sliding, strict=True)
        return "_".join(f"{t}{'s' if s else ''}" for t, s in pairs)

    # --------------------------------------------------------- derived facts
    @property
    def num_layers(self) -> int:
        return len(self.targets)

    @functools.cached_property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers that own K/V projections and cache slots, ascending."""
        return tuple(sorted(set(self.targets)))

    @property
    def num_kv_layers(self) -> int:
        return len(self.kv_layers)

    def is_kv_layer(self, i: int) -> bool:
        return self.targets[i] == i

    @functools.cached_property
    def slot_of_layer(self) -> tuple[int, ...]:
        """Cache slot read by each layer (the slot of its target)."""
        slot = {j: s for s, j in enumerate(self.kv_layers)}
        return tuple(slot[t] for t in self.targets)

    def is_upward(self, i: int) -> bool:
        """Whether layer ``i`` reads an upper layer (strictly causal mask)."""
        return self.targets[i] > i

    @property
    def upward_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_upward(i))

    @property
    def cache_fraction(self) -> float:
        """KV-cache size relative to a standard transformer (``l / L``)."""
        return self.num_kv_layers / self.num_layers

    @functools.cached_property
    def cyclic_blocks(self) -> tuple[CyclicBlock, ...]:
        """Minimal contiguous blocks that must be iterated (docs/design.md §4)."""
        blocks, i, n = [], 0, self.num_layers
        while i < n:
            if self.targets[i] <= i:
                i += 1
                continue
            start, end, k = i, self.targets[i], i
            while k <= end:
                end = max(end, self.targets[k])
                k += 1
            blocks.append(CyclicBlock(start, end))
            i = end + 1
        return tuple(blocks)

    @functools.cached_property
    def segments(self) -> tuple[tuple[int, int, bool], ...]:
        """The forward plan: ``(start, end, iterated)`` runs covering all layers."""
        out, i = [], 0
        for b in self.cyclic_blocks:
            if i < b.start:
                out.append((i, b.start - 1, False))
            out.append((b.start, b.end, True))
            i = b.end + 1
        if i < self.num_layers:
            out.append((i, self.num_layers - 1, False))
        return tuple(out)

    def describe(
        self, forward_passes: int | None = None, backward_passes: int | None = None
    ) -> str:
        """Human-readable summary (first line: the mapping string); the iteration plan
        names m and b when given."""
        blocks = ", ".join(f"[{b.start}..{b.end}]" for b in self.cyclic_blocks) or "none"
        sliding = [i for i, s in enumerate(self.sliding) if s]
        lines = [
            str(self),
            f"layers: {self.num_layers}",
            f"kv layers ({self.num_kv_layers}): {' '.join(map(str, self.kv_layers))}",
            f"upward layers: {' '.join(map(str, self.upward_layers)) or 'none'}",
            f"cyclic blocks: {blocks}",
            (
                f"iteration plan: {forward_passes} passes without gradient + "
                f"{backward_passes} with gradient per cyclic block"
                if forward_passes is not None
                else "iteration plan: m passes without gradient + b with gradient per block"
            )
            if self.cyclic_blocks
            else "iteration plan: single pass (no cyclic blocks)",
            f"sliding-window layers: {' '.join(map(str, sliding)) or 'none'}",
            f"kv cache fraction: {self.num_kv_layers}/{self.num_layers} "
            f"= {self.cache_fraction:.4f}",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------ presets
def _block_target(start: int, end: int, position: str) -> int:
    if position == "bottom":
        return start
    if position == "top":
        return end
    return start + (end - start) // 2


def _fill(targets: list[int], start: int, end: int, position: str) -> None:
    t = _block_target(start, end, position)
    for i in range(start, end + 1):
        targets[i] = t


def preset(part: str, position: str, num_layers: int, num_kv_layers: int) -> KVLayout:
    """One of the nine ``pizza|sandwich|lasagna`` x ``bottom|top|middle`` layouts."""
    n, l_ = num_layers, num_kv_layers
    if part not in PARTS:
        raise ValueError(f"unknown preset {part!r}: expected one of {', '.join(PARTS)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}: expected one of {POSITIONS}")
    if not 1 <= l_ <= n:
        raise ValueError(f"number of KV layers must be in [1, {n}], got {l_}")
    targets = list(range(n))
    if part == "pizza":
        _fill(targets, l_ - 1, n - 1, position)
    elif part == "sandwich":
        bottom, top = -(-(l_ - 1) // 2), (l_ - 1) // 2
        _fill(targets, bottom, n - 1 - top, position)
    else:
        size, extra = divmod(n, l_)
        start = 0
        for b in range(l_):
            end = start + size + (1 if b < extra else 0) - 1
            _fill(targets, start, end, position)
            start = end + 1
    return KVLayout(tuple(targets))


def from_spec(spec: str, num_layers: int) -> KVLayout:
    """Builds a layout from a preset name or a mapping string.

    Accepted: ``"0_6_6_7"``, ``"standard"``, ``"<part>-<position>:<l>"``, ``"cla:K"``
    (lasagna-bottom, blocks of K), ``"lckv:W"`` (sandwich-top, W warm-up layers),
    ``"yoco"`` and ``"mlkv:K"`` (lasagna-bottom with K KV layers).
    """
    spec = spec.strip()
    if _looks_like_mapping(spec):
        return KVLayout.parse(spec, num_layers)
    name, _, arg = spec.partition(":")
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")

    def int_arg() -> int:
        if not re.fullmatch(r"[0-9]+", arg):
            raise ValueError(f"layout {spec!r} needs an integer argument, e.g. {name}:2")
        return int(arg)

    if name == STANDARD and not arg:
        return KVLayout(tuple(range(num_layers)))
    if name == "cla":
        k = int_arg()
        if k < 1:
            raise ValueError(f"cla block size must be >= 1, got {k}")
        return preset("lasagna", "bottom", num_layers, -(-num_layers // k))
    if name == "lckv":
        return preset("sandwich", "top", num_layers, int_arg() + 1)
    if name == "mlkv":
        return preset("lasagna", "bottom", num_layers, int_arg())
    if name == "yoco" and not arg:
        l_ = num_layers // 2 + 1
        base = preset("pizza", "bottom", num_layers, l_)
        return KVLayout(base.targets, tuple(i <= l_ - 2 for i in range(num_layers)))
    part, _, position = name.partition("-")
    if part in PARTS and position in POSITIONS:
        return preset(part, position, num_layers, int_arg())
    raise ValueError(
        f"unknown layout {spec!r}: expected a mapping string like '0_6_6_7', 'standard', "
        "'<pizza|sandwich|lasagna>-<bottom|top|middle>:<l>', 'cla:K', 'lckv:W', "
        "'yoco' or 'mlkv:K'"
    )
