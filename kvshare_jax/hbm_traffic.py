"""HBM bytes a compiled TPU program moves, read from its optimized HLO text.

XLA's cost analysis ("bytes accessed") sums every operand and output of every op in
any memory space. On TPU that counts a weight the compiler stages into VMEM (an async
``slice-start`` from HBM, then the matmul reading VMEM) two or three times, and a
dynamic-update-slice done in place as its whole buffer read and written. So at batch 1
a decode step of a 1B model "accesses" 2.6x its weights while it reads each from HBM
once. This count is the traffic of HBM itself:

- an op reads its operands and writes its output where they live in HBM (layouts
  without a memory space, or ``S(0)``); VMEM (``S(1)``), SMEM and host buffers are free;
- an async ``*-start`` reads (a ``slice-start`` only its slice), its ``*-done`` writes;
- a dynamic-update-slice in place (also as the root of a fusion, on a fusion
  parameter) reads and writes only the update, not the buffer;
- a gather or dynamic-slice (also in a fusion, of a parameter that nothing else reads)
  reads only what it outputs (an embedding row, not the table);
- bitcasts, tuples, parameters and constants move nothing; a ``while`` counts its body
  times its trip count (`_trips`); a ``call``/``conditional`` its (largest) callee.

Other fused operands are read whole: exact for the matmuls and attention reads of a
decode step, an upper bound where a fusion reads part of an operand otherwise.
"""

from __future__ import annotations

import dataclasses
import re

_LEAF = re.compile(r"(\w+)\[([\d,]*)\](?:\{([^}]*)\})?")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_BYTES |= {"bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES |= {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_FREE = {"get-tuple-element", "tuple", "bitcast", "parameter", "constant", "after-all"}
_FREE |= {"partition-id", "replica-id", "opt-barrier"}


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    inner: str  # the text inside the op's parentheses (a parameter's index)
    attrs: str


def _arrays(shape: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array of a shape string."""
    out = []
    for dtype, dims, layout in _LEAF.findall(shape):
        if dtype in _BYTES:
            n = _BYTES[dtype]
            for d in filter(None, dims.split(",")):
                n *= int(d)
            space = re.search(r"S\((\d+)\)", layout)
            out.append((n, space is None or space.group(1) == "0"))
    return out


def _hbm(shape: str) -> int:
    return sum(n for n, in_hbm in _arrays(shape) if in_hbm)


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == "(") - (text[i] == ")")
        if depth == 0:
            return i
    raise ValueError(f"unbalanced HLO: {text[:80]!r}")


def parse(text: str) -> tuple[dict[str, list[_Op]], str]:
    """The computations of an HLO module (ops in order, the root last) and the entry's
    name."""
    comps: dict[str, list[_Op]] = {}
    body: list[_Op] | None = None
    root: _Op | None = None
    entry = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = re.match(r"(?:ENTRY )?%?(\S+)", line).group(1)
            body, root = comps.setdefault(name, []), None
            entry = name if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}" and body is not None:
            if root is not None:  # the root last
                body.remove(root)
                body.append(root)
            body = None
            continue
        m = re.match(r"\s+(ROOT )?%(\S+) = (.*)", line)
        if m is None or body is None:
            continue
        rest = m.group(3)
        end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        op = re.match(r"([\w-]+)\(", rest)
        if op is None:
            continue
        close = _closing(rest, len(op.group(1)))
        inner = rest[len(op.group(1)) + 1 : close]
        ins = _Op(m.group(2), shape, op.group(1), tuple(re.findall(r"%([\w.\-]+)", inner)),
                  inner, rest[close + 1 :])  # fmt: skip
        body.append(ins)
        root = ins if m.group(1) else root
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def hbm_bytes(text: str) -> int:
    """Bytes read from and written to HBM by the optimized (TPU) HLO module ``text``,
    e.g. ``compiled.as_text()`` (rules in the module docstring)."""
    comps, entry = parse(text)
    shapes = {op.name: op.shape for ops in comps.values() for op in ops}
    return _computation(comps, shapes, entry)


def _computation(comps: dict[str, list[_Op]], shapes: dict[str, str], name: str) -> int:
    total = 0
    for op in comps[name]:
        if op.opcode in _FREE or 'custom_call_target="ConcatBitcast"' in op.attrs:
            continue
        if op.opcode == "while":
            body = re.search(r"body=%([\w.\-]+)", op.attrs).group(1)
            total += _trips(comps, op) * _computation(comps, shapes, body)
            continue
        if op.opcode in ("call", "conditional"):
            called = re.findall(r"%([\w.\-]+)", op.attrs.split("metadata=")[0])
            total += max((_computation(comps, shapes, c) for c in called if c in comps), default=0)
            continue
        reads = [_hbm(shapes.get(a, "")) for a in op.operands]
        write = _hbm(op.shape)
        if op.opcode == "slice-start":  # ((source), slice, context): moves the slice
            total += _arrays(op.shape)[-2][0] if sum(reads) else 0
        elif op.opcode.endswith("-start"):
            total += sum(reads)
        elif op.opcode.endswith("-done"):
            total += write
        else:
            for i, nbytes in _partial_reads(comps, op).items():
                reads[i] = min(reads[i], nbytes)
            for i, update in _in_place(comps, shapes, op).items():
                write += update - reads[i]  # the buffer stays; only the update moves
                reads[i] = update
            total += sum(reads) + write
    return total


def _trips(comps: dict[str, list[_Op]], op: _Op) -> int:
    """A while loop's trip count: XLA's known count, else the bound N of a condition
    ``counter < N`` (JAX's loops count from 0); 1 when neither is there."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', op.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", op.attrs)
    ops = comps.get(cond.group(1), []) if cond else []
    if not ops or ops[-1].opcode != "compare" or "direction=LT" not in ops[-1].attrs:
        return 1
    byname = {o.name: o for o in ops}
    bound = byname.get(ops[-1].operands[-1])
    return int(bound.inner) if bound and bound.opcode == "constant" and bound.inner.isdigit() else 1


_SLICING = ("dynamic-slice", "gather", "slice")


def _partial_reads(comps: dict[str, list[_Op]], op: _Op) -> dict[int, int]:
    """{operand index: bytes read} for the operands ``op`` reads only a slice of."""
    if op.opcode in _SLICING:
        return {0: _hbm(op.shape)}
    body = _fused(comps, op)
    if body is None:
        return {}
    found = {}
    for param in (o for o in body if o.opcode == "parameter"):
        users = [o for o in body if param.name in o.operands]
        if users and all(u.opcode in _SLICING and u.operands[0] == param.name for u in users):
            found[int(param.inner)] = sum(_size(u.shape) for u in users)
    return found


def _fused(comps: dict[str, list[_Op]], op: _Op) -> list[_Op] | None:
    """The ops of a fusion's computation (None for other ops)."""
    called = re.search(r"calls=%([\w.\-]+)", op.attrs)
    if op.opcode != "fusion" or called is None:
        return None
    return comps.get(called.group(1))


def _size(shape: str) -> int:
    return sum(n for n, _ in _arrays(shape))


def _in_place(comps: dict[str, list[_Op]], shapes: dict[str, str], op: _Op) -> dict[int, int]:
    """{operand index: bytes of its update} for the operands ``op`` updates in place: a
    dynamic-update-slice's buffer, or a fusion parameter its root updates so."""
    if op.opcode == "dynamic-update-slice":
        return {0: _hbm(shapes.get(op.operands[1], ""))} if _hbm(op.shape) else {}
    ops = _fused(comps, op)
    if not ops:
        return {}
    body = {o.name: o for o in ops}
    root = ops[-1]
    outs = [body[a] for a in root.operands] if root.opcode == "tuple" else [root]
    found = {}
    for out in outs:
        buffer = body.get(out.operands[0]) if out.operands else None
        if out.opcode == "dynamic-update-slice" and buffer and buffer.opcode == "parameter":
            found[int(buffer.inner)] = _size(body[out.operands[1]].shape)
    return found
